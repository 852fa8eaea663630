"""What the server accepts from a node: the reply checks of the federation, apart from the strategy.

A registered client can send any bytes, metadata and id. ``ReplyReader.read`` turns one train reply
into a checked ``ClientUpdate`` or into a reason the client is left out of the round (written to the
round's ``RoundLog``); it never raises, so no reply can stop the federation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from florist.errors import InvalidUpdate
from florist.flower.codec import (
    KnownA,
    check_declared,
    check_declared_cores,
    decode_cores,
    decode_upload,
    payload_bytes,
    received_bytes,
)
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.validation import check_update
from florist.server.size_guard import MessageTooLarge, check_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientInfo:
    """What a node told the server when the run started (``query.hello``)."""

    node_id: int
    client_id: str
    index: int
    rank: int
    num_examples: int
    held: tuple[int, ...] = ()  # global rounds already in the node's state (a restarted server)


@dataclass
class RoundLog:
    """Bytes and client figures of one round, filled as the round goes."""

    round: int
    clients: list[str] = field(default_factory=list)
    bytes_down: int = 0  # the latest global update, sent at the start of this round
    bytes_catchup: int = 0  # older global updates sent to clients that skipped rounds
    bytes_up: int = 0
    bytes_init_up: int = 0  # round 0's gradients (Fed-SB), counted with round 1
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    timed_out: list[str] = field(default_factory=list)  # sampled clients whose reply came too late
    skipped: str | None = None  # why the round was skipped (global model unchanged)
    clip: dict[str, Any] | None = None  # robust mode: threshold, norms, factors per client

    def reject(self, who: str, reason: str, key_suffix: str = "") -> None:
        """Leave ``who`` out of this round for ``reason`` (a second reason gets ``key_suffix``)."""
        key = who if who not in self.rejected else who + key_suffix
        self.rejected[key] = reason
        log.warning("round %d: %s left out: %s", self.round, who, reason)

    def reasons(self) -> str:
        """Every client left out or timed out, with why, on one line."""
        parts = [f"{who}: {why}" for who, why in self.rejected.items()]
        parts += [f"{who}: no reply within the round timeout" for who in self.timed_out]
        return "; ".join(parts) or "no replies"


@dataclass(frozen=True)
class ReplyReader:
    """The checks every train reply passes before its update is aggregated.

    Parameters
    ----------
    by_node : Mapping[int, ClientInfo]
        The nodes that joined, by node id.
    expected : Mapping[str, tuple[int, int]]
        Every adapted module and its weight shape ``(m, n)``.
    max_message_mb : float
        Largest reply accepted, on the payload and on what its metadata claims.
    known_a : KnownA | None
        The A that B-only uploads were trained against (FFA-LoRA, FedSVD); None when clients send A.
    merged_rounds : Callable[[int], list[int]] | None
        Merge protocols: the rounds a client must hold when it replies in a round; None otherwise.
    wire : str
        The run's wire dtype: every uploaded array must arrive in it.
    basis : Callable[[], Mapping[str, LoraFactors]] | None
        Core protocols (Fed-SB): the basis the server sent last; uploads carry only the core.
    """

    by_node: Mapping[int, ClientInfo]
    expected: Mapping[str, tuple[int, int]]
    max_message_mb: float
    known_a: KnownA | None
    merged_rounds: Callable[[int], list[int]] | None
    wire: str = "float32"
    basis: Callable[[], Mapping[str, LoraFactors]] | None = None

    def who(self, node: int) -> str:
        info = self.by_node.get(node)
        return info.client_id if info else f"node {node}"

    def read(self, round: int, msg: Message, log_: RoundLog) -> ClientUpdate | None:
        """The checked update of ``msg``, or None with the reason in ``log_``; bytes up counted."""
        who = self.who(msg.metadata.src_node_id)
        if msg.has_error():
            log_.reject(who, f"round {round}: client error: {short_reason(msg.error.reason)}")
            return None
        try:
            size = payload_bytes(msg.content)
            check_message(
                max(size, received_bytes(msg.content)), self.max_message_mb, f"round {round}: the reply"
            )
            update = self._update(msg, who, round)
            self._check(round, msg, update)
            self._check_merged(round, msg, who)
            metrics = numeric_metrics(msg.content.metric_records["metrics"], who, round)
        except (InvalidUpdate, MessageTooLarge) as err:
            log_.reject(who, str(err))
            return None
        except Exception as err:  # a malformed reply must not stop the federation
            log_.reject(who, f"round {round}: unreadable reply: {type(err).__name__}: {err}")
            return None
        log_.bytes_up += size
        log_.client_metrics[who] = metrics
        return update

    def _update(self, msg: Message, who: str, round: int) -> ClientUpdate:
        content = msg.content
        if "lora" not in content.array_records or "metrics" not in content.metric_records:
            raise InvalidUpdate(who, "the reply has no 'lora' arrays or no 'metrics'")
        info = self.by_node.get(msg.metadata.src_node_id)
        if info is None:
            raise InvalidUpdate(who, "the reply comes from a node that did not join")
        lora = content.array_records["lora"]
        n = content.metric_records["metrics"].get("num-examples")
        examples = float(n) if isinstance(n, (int, float)) else float("nan")
        if self.basis is not None:  # a core on the server's basis
            check_declared_cores(lora, who, self.expected, self.wire, info.rank, round)
            return ClientUpdate(who, examples, decode_cores(lora, who, basis=self.basis()))
        check_declared(lora, who, self.expected, self.wire, info.rank, self.known_a is None, round)
        modules = decode_upload(
            content.array_records["lora"], content.config_records["lora_meta"], who, known_a=self.known_a,
            expected=self.expected,
        )  # fmt: skip
        return ClientUpdate(who, examples, modules)

    def _check(self, round: int, msg: Message, update: ClientUpdate) -> None:
        info = self.by_node.get(msg.metadata.src_node_id)
        if info is None:
            raise InvalidUpdate(
                update.client_id, "the reply comes from a node that did not join", round=round
            )
        identity = msg.content.config_records.get("client")
        claimed = identity.get("client_id") if identity is not None else None
        if claimed != info.client_id:
            raise InvalidUpdate(info.client_id, f"the reply claims client id {claimed!r}", round=round)
        check_update(
            update, self.expected, round=round, max_rank=info.rank, max_examples=float(info.num_examples)
        )

    def _check_merged(self, round: int, msg: Message, who: str) -> None:
        """A merge-protocol client must hold exactly the rounds aggregated before this one."""
        if self.merged_rounds is None:
            return
        held = [int(x) for x in msg.content.config_records["client"].get("merged", [])]  # type: ignore[union-attr]
        expected = self.merged_rounds(round)
        if held != expected:
            raise InvalidUpdate(who, f"holds the merges of rounds {held}, expected {expected}", round=round)


MAX_METRICS, MAX_METRIC = 16, 1e15  # keys per reply; largest |value| (a loss, a count of tokens)


def numeric_metrics(record: Any, who: str, round: int) -> dict[str, float]:
    """A reply's metrics as finite floats: at most ``MAX_METRICS`` keys of at most 40 characters,
    each a number of magnitude at most ``MAX_METRIC``; anything else (a list, a string, NaN, 1e308,
    20,000 keys) is a bad reply, so nothing a client sends can flood metrics.jsonl or overflow a mean."""
    if len(record) > MAX_METRICS:
        raise InvalidUpdate(who, f"{len(record)} metrics in the reply; at most {MAX_METRICS}", round=round)
    out = {}
    for key, value in record.items():
        name = str(key)
        if len(name) > 40 or not name.isprintable():
            raise InvalidUpdate(who, f"metric name {printable(name)[:40]!r} is not accepted", round=round)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidUpdate(
                who, f"metric {name!r} must be a finite number, got {value!r:.60}", round=round
            )
        if abs(value) > MAX_METRIC:
            raise InvalidUpdate(who, f"metric {name!r} = {value:.3g} is beyond {MAX_METRIC:.0e}", round=round)
        out[name] = float(value)
    return out


def printable(text: str, limit: int = 300) -> str:
    """``text`` safe for one log line: control characters (ANSI escapes, newlines) shown escaped, cut."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."


def short_reason(reason: str | None) -> str:
    """The client's own exception message out of the Ray traceback Flower wraps around it."""
    text = reason or "unknown error"
    marker = "Message: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return printable(text.strip().removesuffix("'>").strip())


def weighted_mean(per_client: dict[str, dict[str, float]], key: str) -> float:
    """Mean of ``key`` over clients weighted by their example counts."""
    pairs = [(m[key], m.get("num-examples", 1.0)) for m in per_client.values() if key in m]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")
