"""The start of a run: wait for the nodes, ask each who it is (``query.hello``)."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from florist.client.local import client_id
from florist.config import FloristConfig
from florist.errors import FederationError
from florist.flower.replies import ClientInfo, printable, short_reason

log = logging.getLogger(__name__)
MAX_EXAMPLES = 10**9  # a site's declared training examples; the weight p_k follows from it


def hello(grid: Grid, cfg: FloristConfig) -> list[ClientInfo]:
    """Every node's index, rank, example count and the global rounds it already holds.

    A node says which client index it serves (its ``partition-id``); the server checks the claim and
    names the client itself (``client-NNN`` from the index), so no string a node sends is ever used
    as an id or a path. A second node claiming a taken index is refused with a log line; a rank other
    than the config's, or an example count that is not a positive integer, refuses the node too.
    """
    n = cfg.federation.num_clients
    nodes = wait_for_nodes(grid, n, cfg.federation.timeout)
    msgs = [
        Message(RecordDict(), dst_node_id=node, message_type=f"{MessageType.QUERY}.hello") for node in nodes
    ]
    infos: dict[int, ClientInfo] = {}
    for reply in sorted(grid.send_and_receive(msgs, timeout=cfg.federation.timeout), key=_src):
        if reply.has_error():
            reason = short_reason(reply.error.reason)
            raise FederationError(f"node {reply.metadata.src_node_id} failed to start: {reason}")
        try:
            info = client_info(_src(reply), dict(reply.content.config_records["client"]), cfg)
        except Exception as err:  # any claim, any content: refuse the node, never stop the run
            log.warning("hello: node %d refused: %s", _src(reply), printable(str(err)))
            continue
        if info.index in infos:
            log.warning("hello: node %d refused: client index %d is taken by node %d",
                        info.node_id, info.index, infos[info.index].node_id)  # fmt: skip
            continue
        infos[info.index] = info
    missing = sorted(set(range(n)) - set(infos))
    if missing:
        raise FederationError(
            f"no node serves client indices {missing} (of 0..{n - 1}); see the hello log lines"
        )
    return [infos[k] for k in range(n)]


def _src(reply: Message) -> int:
    return int(reply.metadata.src_node_id)


def client_info(node: int, c: dict[str, Any], cfg: FloristConfig) -> ClientInfo:
    """The checked ``ClientInfo`` of a hello reply; ``ValueError`` names what is wrong."""
    n = cfg.federation.num_clients
    index, rank, examples = (_int(c, key) for key in ("index", "rank", "num_examples"))
    if not 0 <= index < n:
        raise ValueError(f"client index {index} is outside 0..{n - 1}")
    if rank != cfg.lora.rank_of(index, n):
        raise ValueError(
            f"client {index} declares rank {rank}; the config gives it {cfg.lora.rank_of(index, n)}"
        )
    if not 0 < examples <= MAX_EXAMPLES:
        raise ValueError(f"client {index} declares {examples} examples; expected 1..{MAX_EXAMPLES:,}")
    return ClientInfo(node, client_id(index), index, rank, examples, _held(c.get("held", []), cfg))


def _held(value: Any, cfg: FloristConfig) -> tuple[int, ...]:
    """The rounds a node says it holds: at most ``federation.rounds`` distinct integers in 1..rounds."""
    rounds = cfg.federation.rounds
    if not isinstance(value, (list, tuple)) or len(value) > rounds:
        raise ValueError(f"held must be a list of at most {rounds} rounds, got {value!r:.60}")
    out = []
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= rounds:
            raise ValueError(f"held rounds must be integers in 1..{rounds}, got {t!r:.40}")
        out.append(t)
    return tuple(out)


def _int(c: dict[str, Any], key: str) -> int:
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r:.40}")
    return value


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {n} nodes connected within {timeout:.0f} s")
        time.sleep(0.5)
    return sorted(nodes)[:n]
