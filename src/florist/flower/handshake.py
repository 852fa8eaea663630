"""The start of a run: wait for the nodes, ask each who it is (``query.hello``)."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from florist.config import RunConfig
from florist.flower.strategy import ClientInfo, short_reason


def hello(grid: Grid, cfg: RunConfig) -> list[ClientInfo]:
    """Every node's client id, index, rank, example count and the global rounds it already holds."""
    nodes = wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.timeout)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=f"{MessageType.QUERY}.hello") for n in nodes]
    infos = []
    for reply in grid.send_and_receive(msgs, timeout=cfg.federation.timeout):
        if reply.has_error():
            reason = short_reason(reply.error.reason)
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: {reason}")
        infos.append(client_info(reply.metadata.src_node_id, dict(reply.content.config_records["client"])))
    indices = sorted(i.index for i in infos)
    if indices != list(range(cfg.federation.num_clients)):
        raise RuntimeError(
            f"nodes report client indices {indices}; expected 0..{cfg.federation.num_clients - 1}"
        )
    return infos


def client_info(node: int, c: dict[str, Any]) -> ClientInfo:
    held = tuple(int(t) for t in c.get("held", []))
    return ClientInfo(
        node, str(c["client_id"]), int(c["index"]), int(c["rank"]), int(c["num_examples"]), held
    )


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {n} nodes connected within {timeout:.0f} s")
        time.sleep(0.5)
    return sorted(nodes)[:n]
