"""A Flower strategy that runs any aggregator from florist's registry on LoRA uploads.

Before round 1, for a protocol that needs one (Fed-SB): round 0, each node's gradient sum
(``query.init``) and the server's starting adapter. Per round t: sample clients; send each the global
updates it is missing (merge protocols: every
round's update since it last synced, in order, so a client that skipped rounds catches up exactly;
other protocols: its share of the latest global adapter); receive LoRA factors; aggregate with
``florist.aggregation``; account the bytes. The numerical work lives in ``florist.aggregation``,
the federation's state and its decisions in ``florist.server.federation.Server``; this class only
moves records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from florist.aggregation.base import Aggregator
from florist.aggregation.protocols import protocol_of
from florist.client.model import load_model, published_name, resolve_model
from florist.config import FloristConfig
from florist.data.federated import test_examples
from florist.errors import InvalidUpdate
from florist.flower.codec import KnownA, decode_gradient, encode_factors, payload_bytes, received_bytes
from florist.flower.handshake import hello
from florist.flower.node import GLOBAL_PREFIX
from florist.flower.replies import ClientInfo, ReplyReader, RoundLog, printable, short_reason, weighted_mean
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.peft_io import write_adapter
from florist.server.evaluation import Evaluator
from florist.server.federation import Server
from florist.server.global_model import GlobalModel, adapted_shapes
from florist.server.size_guard import check_message

log = logging.getLogger(__name__)


class FederatedLoRA(Strategy):
    """Sampling, catch-up, decoding and aggregation of LoRA rounds, as a Flower ``Strategy``.

    ``florist run`` drives it from its own loop (checkpoints, round timeouts, the final sync); a
    user's ServerApp can run it under Flower's ``Strategy.start``::

        strategy = FederatedLoRA.from_config(cfg)      # loads the base model for shapes and evaluation
        strategy.start(grid, ArrayRecord(), num_rounds=cfg.federation.rounds,
                       evaluate_fn=strategy.evaluate_fn())
        strategy.save_adapter("adapter")               # the run's whole update, a PEFT directory

    The nodes join (``query.hello``) when the first round is configured unless ``clients`` are given.
    ``aggregate_train`` returns the global update it aggregated, encoded as it is sent.

    Parameters
    ----------
    cfg : FloristConfig
        The run's configuration (federation and lora sections are read here).
    aggregator : Aggregator
        From ``cfg.aggregator()``.
    clients : Sequence[ClientInfo] | None
        Every node of the federation; None: ask them when the first round is configured.
    expected : Mapping[str, tuple[int, int]]
        Every adapted module of the model and its weight shape ``(m, n)``; an upload must match it.
    server : Server | None
        The federation's state; by default one is created when the nodes join, folding results into
        ``model`` (the server's ``GlobalModel``) when one is given.
    """

    def __init__(
        self,
        cfg: FloristConfig,
        aggregator: Aggregator,
        clients: Sequence[ClientInfo] | None,
        expected: Mapping[str, tuple[int, int]],
        server: Server | None = None,
        model: GlobalModel | None = None,
    ) -> None:
        self.cfg, self.aggregator, self.expected = cfg, aggregator, dict(expected)
        self.rules = protocol_of(aggregator.protocol)
        self.model = model if model is not None else (server.model if server is not None else None)
        self._server = server
        self.logs: dict[int, RoundLog] = {}
        self.holds_basis: set[str] = set()  # core protocols: clients known to hold the server's basis
        self.restore_bytes: dict[str, int] = {}
        self.clients: list[ClientInfo] = []
        if clients is not None:
            self.join(clients)

    @classmethod
    def from_config(cls, cfg: FloristConfig) -> FederatedLoRA:
        """The strategy of ``cfg``, with the server's copy of the global model (the base model of
        ``model.name``, loaded here) for the adapted shapes and for ``evaluate_fn``."""
        model, tokenizer = load_model(resolve_model(cfg.model.name), cfg.model.torch_dtype())
        aggregator = cfg.aggregator()
        expected = adapted_shapes(model, cfg.lora.target_modules)
        glob = GlobalModel(
            model.to(cfg.model.torch_device()), tokenizer, aggregator.protocol, cfg.held_updates()
        )
        return cls(cfg, aggregator, None, expected, model=glob)

    def join(self, clients: Sequence[ClientInfo]) -> None:
        """Take the federation's nodes (from ``query.hello``); creates the server state if none."""
        cfg = self.cfg
        self.clients = sorted(clients, key=lambda c: c.index)
        self.by_node = {c.node_id: c for c in self.clients}
        self.node_of = {c.client_id: c.node_id for c in self.clients}
        if self._server is None:
            self._server = Server(cfg, self.aggregator, self.clients, self.model, self.expected)
        self.reader = ReplyReader(
            self.by_node, self.expected, cfg.federation.max_message_mb, self._known_a(),
            self.server.merged_before if self.merges else None, cfg.federation.wire_dtype,
            (lambda: self.server.latest().global_update) if self.rules.needs_init else None,
        )  # fmt: skip

    def _known_a(self) -> KnownA | None:
        """The A of B-only uploads, as the protocol says (read from the results sent when asked)."""
        if self.rules.uploads_a:
            return None
        seed, rows = self.cfg.federation.seed, max(c.rank for c in self.clients)
        return KnownA(rows, lambda name, n: self.rules.upload_a(self.server.sent(), seed, rows, name, n))

    @property
    def server(self) -> Server:
        """The federation's state (``florist.server.federation.Server``); exists once nodes joined."""
        if self._server is None:
            raise RuntimeError("no node has joined yet: the server state exists from the first round")
        return self._server

    # ------------------------------------------------------------ for a user's ServerApp

    def final_adapter(self) -> dict[str, LoraFactors]:
        """The run's whole update against the base model, as one adapter."""
        return self.server.final_adapter()

    def save_adapter(self, path: str | Path) -> Path:
        """Write ``final_adapter()`` as a PEFT adapter directory (safetensors + adapter_config.json)."""
        base = published_name(self.cfg.model.name)
        return write_adapter(Path(path), self.final_adapter(), base_model=base, overwrite=True)

    def evaluate_fn(self) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """For ``Strategy.start(evaluate_fn=...)``: scores the server's global model (base model plus
        every result so far) on the held-out rows of ``cfg.data`` as ``cfg.eval`` says, in the
        rounds ``eval.every`` selects; the numbers as a ``MetricRecord``."""
        if self.model is None:
            raise RuntimeError("evaluate_fn needs the server's model: build the strategy with from_config")
        model, evaluator = (
            self.model,
            Evaluator(self.cfg.eval, test_examples(self.cfg.data), self.cfg.data.seed),
        )

        def evaluate(round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if not evaluator.due(round, self.cfg.federation.rounds):
                return None
            scores = evaluator(model.model, model.tokenizer)
            return MetricRecord({k: float(v) for k, v in scores.items() if isinstance(v, (int, float))})

        return evaluate

    @property
    def merges(self) -> bool:
        return self.rules.merges

    @property
    def sends_a(self) -> bool:
        return self.rules.sends_a

    # ------------------------------------------------------------ what the federation reads

    def client_of(self, node_id: int) -> str:
        """The client id of ``node_id`` (``"node N"`` for a node that never joined)."""
        return self.reader.who(node_id)

    def info(self, node_id: int) -> ClientInfo | None:
        return self.by_node.get(node_id)

    def node_ids(self) -> list[int]:
        return [c.node_id for c in self.clients]

    def round_log(self, round: int) -> RoundLog:
        """What round ``round`` sent, received and left out (created when the round is configured)."""
        return self.logs.setdefault(round, RoundLog(round))

    def restored_bytes(self) -> int:
        return sum(self.restore_bytes.values())

    # ------------------------------------------------------------------ sampling and downloads

    def participants(self, round: int) -> list[ClientInfo]:
        """Clients of ``round`` (``Server.participants``)."""
        return [self.by_node[self.node_of[m.client_id]] for m in self.server.participants(round)]

    def outgoing(self, node_id: int) -> dict[int, ArrayRecord]:
        """Global updates ``node_id`` is missing, by round (``Server.owed``), encoded; a core protocol's
        basis goes to a client until one of its replies shows it holds it."""
        wire, who = self.cfg.federation.wire_dtype, self.by_node[node_id].client_id
        owed, basis = self.server.owed(who), who not in self.holds_basis
        return {
            t: encode_factors(f, with_a=self.sends_a, wire=wire, with_basis=basis) for t, f in owed.items()
        }

    def messages(self, round: int, nodes: Iterable[int], message_type: str, log_: RoundLog) -> list[Message]:
        """One message per node carrying ``round`` and what it is missing; bytes go to ``log_``."""
        out = []
        latest = self.server.history[-1][0] if self.server.history else None
        for node in nodes:
            content = RecordDict({"config": ConfigRecord({"round": round})})
            total = 0
            for t, record in self.outgoing(node).items():
                content[f"{GLOBAL_PREFIX}{t}"] = record
                size = payload_bytes(RecordDict({"a": record}))
                total += size
                if t == latest:
                    log_.bytes_down += size
                else:
                    log_.bytes_catchup += size
            check_message(total, self.cfg.federation.max_message_mb,
                          f"the round {round} message to {self.by_node[node].client_id}")  # fmt: skip
            out.append(Message(content=content, dst_node_id=node, message_type=message_type))
        return out

    def restore_messages(self, round: int) -> list[Message]:
        """After a server restart: each node gets the rounds it held at the checkpoint and lacks now."""
        out = []
        for c in self.clients:
            content = RecordDict({"config": ConfigRecord({"round": round})})
            for t, update in self.server.held_lacking(c.client_id, c.held).items():
                content[f"{GLOBAL_PREFIX}{t}"] = encode_factors(update, wire=self.cfg.federation.wire_dtype)
            self.restore_bytes[c.client_id] = payload_bytes(content)
            if self.restore_bytes[c.client_id]:
                out.append(
                    Message(content=content, dst_node_id=c.node_id, message_type=f"{MessageType.QUERY}.sync")
                )
        return out

    # ------------------------------------------------------------------ Flower Strategy interface

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.clients:
            self.join(hello(grid, self.cfg))
        self.initialise(grid)
        log_ = self.round_log(server_round)
        chosen = self.participants(server_round)
        log_.clients = [c.client_id for c in chosen]
        log.info(
            "round %d: training on %s", server_round, ", ".join(log_.clients) or "no client (an empty sample)"
        )
        return self.messages(server_round, [c.node_id for c in chosen], MessageType.TRAIN, log_)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the usable replies; never raises.

        A reply that fails a check leaves its client out of the round (``RoundLog.rejected`` names
        client, round, module and reason). With fewer usable updates than ``Server.min_updates``,
        or if the aggregator fails, the round is skipped: returns ``(None, metrics)`` and the global
        model stays as it was (``RoundLog.skipped`` says why).
        """
        log_ = self.round_log(server_round)
        updates = self._usable(server_round, list(replies), log_)
        need = self.server.min_updates()
        if len(updates) < need:
            return self._skip(log_, f"{len(updates)} usable update(s), {need} required ({log_.reasons()})")
        try:
            outcome = self.server.round(server_round, updates)
        except Exception as err:  # an aggregator failure must not stop the federation
            return self._skip(log_, f"aggregation failed: {type(err).__name__}: {err}")
        for who, why in outcome.dropped.items():
            log_.reject(who, why)
        if outcome.clip is not None:
            r = outcome.clip
            log_.clip = {"threshold": r.threshold, "norms": r.norms, "factors": r.factors}
        if outcome.result is None:
            return self._skip(
                log_, f"no subset of the updates aggregates to finite values ({log_.reasons()})"
            )
        loss = weighted_mean(log_.client_metrics, "train_loss")
        return encode_factors(outcome.result.global_update, with_a=self.sends_a), MetricRecord(
            {"train_loss": loss}
        )

    def _usable(self, round: int, replies: list[Message], log_: RoundLog) -> list[ClientUpdate]:
        """Decoded, checked updates of the clients sampled this round, at most one per node."""
        sampled = {c.node_id for c in self.participants(round)}
        seen: set[int] = set()
        updates = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if node in seen or node not in sampled:
                why = "duplicate reply" if node in seen else "reply from a node not sampled this round"
                log_.reject(self.reader.who(node), f"round {round}: {why}: discarded", key_suffix="+dup")
                continue
            seen.add(node)
            update = self.reader.read(round, msg, log_)
            if update is not None:
                updates.append(update)
                self.holds_basis.add(update.client_id)  # it trained on the basis, so it holds it
        return updates

    def initialise(self, grid: Grid) -> None:
        """Round 0 where the protocol needs one and none ran (Fed-SB): every node sums the gradient of
        its adapted base weights over its share of ``aggregation.init_samples`` rows (``query.init``);
        the server builds the starting adapter from the sums that pass the checks (a bad reply leaves
        its node out, logged) and opens the history with it. The gradients' bytes count in round 1."""
        if not self.rules.needs_init or self.server.history:
            return
        cfg, fed = self.cfg, self.cfg.federation
        shares, lr = cfg.round_zero([c.num_examples for c in self.clients])
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"rows": k})}), dst_node_id=c.node_id,
                    message_type=f"{MessageType.QUERY}.init")
            for c, k in zip(self.clients, shares, strict=True)
        ]  # fmt: skip
        log_, gradients = self.round_log(1), {}
        for reply in grid.send_and_receive(msgs, timeout=fed.timeout):
            who = self.reader.who(reply.metadata.src_node_id)
            try:
                if reply.has_error():
                    raise InvalidUpdate(who, f"client error: {short_reason(reply.error.reason)}", round=0)
                size = payload_bytes(reply.content)
                check_message(
                    max(size, received_bytes(reply.content)), fed.max_message_mb, "round 0: the reply"
                )
                if reply.metadata.src_node_id not in self.by_node or who in gradients:
                    raise InvalidUpdate(who, "a round-0 reply from a node that did not join, or a second one")
                record = reply.content.array_records["gradient"]
                gradients[who] = decode_gradient(record, who, self.expected, fed.wire_dtype)
                log_.bytes_init_up += size
            except Exception as err:  # any bytes: leave the node out of round 0, never stop the run
                log.warning("round 0: %s left out: %s", who, printable(str(err)))
        if len(gradients) < fed.min_replies:
            raise RuntimeError(
                f"round 0 of {self.aggregator.name}: {len(gradients)} usable gradient(s), "
                f"{fed.min_replies} required (federation.min_replies); see the round 0 log lines"
            )
        rank = max(c.rank for c in self.clients)
        self.server.start_from([gradients[k] for k in sorted(gradients)], rank, lr)
        log.info("round 0: the starting adapter from %d clients' gradients", len(gradients))

    def _skip(self, log_: RoundLog, reason: str) -> tuple[None, MetricRecord]:
        log_.skipped = reason
        self.server.skip(log_.round, reason)
        return None, MetricRecord({"skipped": 1})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the global model is evaluated on the server (server_app.py)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        agg, rounds = self.aggregator, self.cfg.federation.rounds
        log.info(
            "FederatedLoRA: %s (%s), %d clients, %d rounds",
            agg.name,
            agg.protocol.value,
            len(self.clients),
            rounds,
        )
