"""An in-process federation for comparisons: the same clients, aggregators and evaluation as
``florist run``, without the transport, so round 1 can be trained once and shared by every method.

Round 1 starts every client from the base model with a fresh LoRA whose A is drawn by the init
policy (``florist.client.local``), so its uploads are the same for every method whose clients train
both A and B from the same draw: all merge-protocol methods under one ``lora.init``, and the
continue-protocol methods with them when ``lora.init = "shared"`` (``compare.round_one_key``).
After round 1, merge-protocol clients restart their LoRA and continue-protocol clients overwrite it
with their download, so nothing else of round 1's local state carries over: reusing the uploads is
exact, not an approximation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from florist.aggregation import communication, efficiency
from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.aggregation.comm import download_ranks, init_bytes
from florist.aggregation.linalg import energy_beyond
from florist.aggregation.lowrank import prepare_upload
from florist.aggregation.protocols import protocol_of
from florist.client.local import LocalClient, client_from_config, client_id
from florist.client.model import load_client_model, load_model
from florist.client.train import encode_all
from florist.config import FloristConfig
from florist.data.federated import client_examples
from florist.lora import ClientUpdate, LoraFactors
from florist.server import checkpoint
from florist.server.federation import Member, Server
from florist.server.global_model import GlobalModel
from florist.server.round import round_deltas

log = logging.getLogger(__name__)
Evaluate = Callable[[Any, Any], dict[str, Any]]


LIVE_CLIENTS = 16  # a larger federation keeps a client (its own model) only while it trains


def make_client(cfg: FloristConfig, protocol: ClientProtocol, k: int) -> LocalClient:
    """Client ``k`` of ``cfg``'s federation on its own copy of the base model."""
    n = cfg.federation.num_clients
    device_model, tok = load_client_model(cfg)
    return client_from_config(cfg, k, device_model, tok, client_examples(cfg.data, k, n), protocol)


def train_round(clients: Iterable[LocalClient], round: int) -> tuple[list[ClientUpdate], dict[str, Any]]:
    """Each client's round (in one pass: ``clients`` may build each just before it trains)."""
    updates, seconds, loss, tokens, eps, total = [], 0.0, 0.0, {}, [], 0
    for c in clients:
        update, stats = c.fit(round)
        updates.append(update)
        if stats.epsilon is not None:
            eps.append(stats.epsilon)
        seconds += stats.seconds
        loss += stats.loss * c.num_examples
        total += c.num_examples
        tokens[c.client_id] = stats.tokens
        del c  # ``clients`` may drop it before building the next (one client model in memory)
    if not updates:  # client-level DP's Poisson sample can be empty (the round releases noise alone)
        return [], {"train_loss": float("nan")}
    if eps:  # DP-SGD: loss, tokens and time depend on the secretly sampled rows, without noise
        return updates, {"train_loss": float("nan"), "epsilon_max": max(eps)}  # the worst client's
    return updates, {"train_loss": loss / total, "train_seconds": seconds, "train_tokens": tokens}


def dense(factors: Mapping[str, LoraFactors], name: str) -> torch.Tensor:
    return factors[name].delta(torch.float64)


def round_error(
    result: AggregationResult, deltas: Sequence[ClientUpdate], previous: Mapping[str, LoraFactors] | None
) -> float:
    """The round's error, one definition for every method (dense, per module, summed):

        || W_t - sum_k p_k W_k,t ||_F  /  || sum_k p_k W_k,t - W_{t-1} ||_F

    W_t is the global model after the round, W_k,t client k's trained model, W_{t-1} the global model
    before it. Merge methods (clients train a change of W_{t-1}): ``|| dW_g - sum p_k B_k A_k || /
    || sum p_k B_k A_k ||``. Continue methods (clients train the adapter G itself, from G_{t-1}):
    ``|| G_t - sum p_k B_k A_k || / || sum p_k B_k A_k - G_{t-1} ||``, so both measure this round only.
    """
    num = den = 0.0
    for name, g in result.global_update.items():
        exact = sum(result.weights[u.client_id] * u.change(name, torch.float64) for u in deltas)
        assert isinstance(exact, torch.Tensor)
        start = dense(previous, name) if previous is not None else torch.zeros_like(exact)
        num += float((g.delta(torch.float64) - exact).square().sum())
        den += float((exact - start).square().sum())
    return (num / den) ** 0.5 if den else 0.0


def round_record(
    round: int, result: AggregationResult, uploads: Sequence[ClientUpdate], deltas: Sequence[ClientUpdate],
    previous: Mapping[str, LoraFactors] | None, wire: str, min_rank: int,
) -> dict[str, Any]:  # fmt: skip
    """Bytes as sent (uploads, in the wire dtype), ranks and efficiency of this round, its error, and
    the share of the global update's energy beyond the smallest client rank (rank collapse)."""
    comm = communication(uploads, result, wire)
    ranks = download_ranks(result)
    return {
        "round": round,
        "bytes_up": comm.uplink_total,
        "bytes_down": comm.downlink_total,
        "efficiency_e-4": efficiency(result),
        "aggregation_seconds": result.seconds,
        "ranks": ranks,
        "rank_total": sum(ranks.values()),
        "round_error": round_error(result, deltas, previous),
        "energy_beyond_min_rank": energy_beyond(result.global_update, min_rank),
    }


class Variant:
    """One method's run: its clients and a ``Server`` (the results sent, the server's model).

    Each round trains the clients the server samples (``Server.participants``: every client unless
    ``federation.fraction`` or a schedule says otherwise). A client is built when first needed and
    takes what it is owed just before it trains, as a Flower node does; in a federation of more than
    ``live_clients`` (default ``LIVE_CLIENTS``) it is built just before it trains, dropped right
    after (only one client model in memory at a time) and rebuilt when sampled again, catching up from
    the server's state as after a restart (exact: its seeds depend on the round, not the process)."""

    def __init__(self, cfg: FloristConfig, live_clients: int = LIVE_CLIENTS) -> None:
        self.cfg = cfg
        self.keeps_clients = cfg.federation.num_clients <= live_clients
        self.raw: dict[str, ClientUpdate] = {}  # a dropped client's last upload before the cut
        self.agg = cfg.aggregator()
        self.rules = protocol_of(self.agg.protocol)
        self.live: dict[int, LocalClient] = {}
        self.fresh: set[int] = set()  # built since they last held anything: catch up in full
        model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        n = cfg.federation.num_clients
        members = [Member(client_id(k), k, cfg.lora.rank_of(k, n)) for k in range(n)]
        self.server = Server(
            cfg,
            self.agg,
            members,
            GlobalModel(model.to(cfg.model.torch_device()), tok, self.agg.protocol, cfg.held_updates()),
        )
        self.rank = self.server.ranks
        self.init_bytes: tuple[int, int] | None = None  # round 0's (up, down), counted in round 1

    def client(self, k: int) -> LocalClient:
        """Client ``k``, built if it is not live."""
        if k not in self.live:
            self.live[k] = make_client(self.cfg, self.agg.protocol, k)
            self.fresh.add(k)
        return self.live[k]

    def ready(self, k: int) -> LocalClient:
        """Client ``k`` with what it is owed (``Server.owed``; built since it last held anything: also
        what the server's state says it held, ``Server.held_lacking``), ready to train."""
        c = self.client(k)
        owed = self.server.owed(c.client_id)
        if k in self.fresh:
            owed = self.server.held_lacking(c.client_id, ()) | owed
            self.fresh.discard(k)
        for t in sorted(owed):
            c.receive(owed[t], round=t)
        return c

    def retire(self) -> None:
        """After a round in a large federation, the clients that trained give their memory back."""
        if not self.keeps_clients:
            self.live.clear()
            self.fresh.clear()

    def begin(self) -> None:
        """Round 0 where the protocol needs one (Fed-SB): every client's summed gradient over its share
        of ``aggregation.init_samples`` rows and the server's starting adapter (each client takes it
        before it first trains)."""
        cfg, n = self.cfg, self.cfg.federation.num_clients
        model = self.server.model
        assert model is not None
        # n_k as each client counts it (what it encodes), without building its model
        sizes = [
            len(encode_all(client_examples(cfg.data, k, n), model.tokenizer, cfg.train)) for k in range(n)
        ]
        gradients = {}
        shares, lr = cfg.round_zero(sizes)
        for k, share in enumerate(shares):
            c = self.client(k)
            gradients[c.client_id] = c.init_gradient(share)
            if not self.keeps_clients:
                del self.live[k], c
        rank = max(self.rank.values())
        start = self.server.start_from(list(gradients.values()), rank, lr)
        self.init_bytes = init_bytes(gradients, start, cfg.federation.wire_dtype)

    def uploads(
        self, t: int, round_one: list[ClientUpdate] | None
    ) -> tuple[list[ClientUpdate], dict[str, Any]]:
        if t == 1 and round_one is not None:
            fed = self.cfg.federation
            prepared = [replace(u, modules=prepare_upload(u.modules, fed.uplink_tau, fed.wire_dtype)[0])
                        for u in self.sampled(round_one, t)]  # fmt: skip
            return prepared, {"train_loss": float("nan"), "train_seconds": 0.0, "shared": 1.0}
        members = self.server.participants(t)
        if self.keeps_clients:
            return train_round([self.ready(m.index) for m in members], t)
        return train_round(self.one_at_a_time([m.index for m in members]), t)

    def one_at_a_time(self, indices: Sequence[int]) -> Iterator[LocalClient]:
        """The clients ``indices``, each built (and caught up) just before it trains and dropped right
        after, its upload before the cut kept for the round's error (``raw_uploads``)."""
        self.raw.clear()
        for k in indices:
            c = self.ready(k)
            yield c
            self.raw[c.client_id] = ClientUpdate(c.client_id, float(c.num_examples), c.raw_upload)
            del self.live[k], c

    def sampled(self, round_one: Sequence[ClientUpdate], t: int) -> list[ClientUpdate]:
        """The shared round-1 uploads of the clients the server samples in round ``t``."""
        chosen = {m.client_id for m in self.server.participants(t)}
        return [u for u in round_one if u.client_id in chosen]

    def previous_adapter(self) -> Mapping[str, LoraFactors] | None:
        """G_{t-1} for continue protocols (what their clients started from); None for merge ones."""
        return self.rules.round_start(self.server.sent())

    def round(self, t: int, round_one: list[ClientUpdate] | None) -> tuple[AggregationResult, dict[str, Any]]:
        start = time.perf_counter()
        uploads, train = self.uploads(t, round_one)
        previous = self.previous_adapter()
        raw = None
        if self.cfg.federation.uplink_tau is not None and self.cfg.privacy.mode != "client":
            # the error against what the clients trained (under client-level DP the aggregate is of
            # one noised update: its round_error is against that)
            raw = round_deltas(self.cfg, self.raw_uploads(t, round_one), self.server.sent(), self.rank)
        outcome = self.server.round(t, uploads)
        if outcome.result is None or outcome.dropped:  # the bench's clients are honest: say so loudly
            raise RuntimeError(f"round {t}: {outcome.dropped or 'no finite aggregate'}")
        result, deltas = outcome.result, outcome.updates
        record = round_record(
            t, result, uploads, deltas, previous, self.cfg.federation.wire_dtype, min(self.rank.values())
        )
        if outcome.clip is not None:
            record["clip"] = {"threshold": outcome.clip.threshold, "factors": outcome.clip.factors}
        if raw is not None:
            record["round_error_untruncated"] = round_error(result, raw, previous)
        if (acc := self.cfg.accountant()) is not None:  # client-level DP: what the run spent so far
            record["epsilon"] = acc.epsilon(t)
        if t == 1 and self.init_bytes is not None:  # round 0's bytes count with round 1's
            record["init_bytes_up"], record["init_bytes_down"] = self.init_bytes
            record["bytes_up"] += self.init_bytes[0]
            record["bytes_down"] += self.init_bytes[1]
        self.retire()
        return result, record | train | {"round_seconds": time.perf_counter() - start}

    def raw_uploads(self, t: int, round_one: list[ClientUpdate] | None) -> list[ClientUpdate]:
        """Round ``t``'s uploads before uplink truncation and wire rounding (float32, as trained)."""
        if t == 1 and round_one is not None:
            return self.sampled(round_one, t)
        members = self.server.participants(t)
        if not self.keeps_clients:
            return [self.raw[client_id(m.index)] for m in members]
        trained = [self.live[m.index] for m in members]
        return [ClientUpdate(c.client_id, float(c.num_examples), c.raw_upload) for c in trained]

    def save(self, folder: Path, records: list[dict[str, Any]]) -> None:
        """The server's state with the records so far, as a server checkpoint (the latest only)."""
        state = self.server.state
        state.round, state.records = len(records), records
        checkpoint.save(folder, state, self.cfg, keep=1)

    def resume(self, folder: Path) -> list[dict[str, Any]]:
        """Continue from the checkpoint in ``folder`` (none there: start at round 1): the server's
        state and model, and every client caught up; returns the records so far."""
        if not checkpoint.checkpoints(folder):
            folder.mkdir(parents=True, exist_ok=True)
            return []
        self.server.restore(checkpoint.load_latest(folder, self.cfg, force=False))
        self.fresh |= set(self.live)  # every client catches up in full before it trains
        state = self.server.state
        log.info("%s: resumed after round %d from %s", self.cfg.aggregation.method, state.round, folder)
        return state.records


def run_variant(
    cfg: FloristConfig,
    evaluate: Evaluate,
    round_one: list[ClientUpdate] | None = None,
    on_result: Callable[[int, AggregationResult], None] | None = None,
    eval_rounds: Sequence[int] | None = None,
    checkpoint: Path | None = None,
    live_clients: int = LIVE_CLIENTS,
) -> list[dict[str, Any]]:
    """All rounds of one method; ``round_one`` (raw uploads) replaces round 1's local training;
    ``live_clients``: the largest federation whose clients all stay built (``Variant``).

    ``evaluate(model, tokenizer)`` runs after the rounds in ``eval_rounds`` (default: every round).
    With ``checkpoint`` (a folder), every finished round is saved there (``florist.server.checkpoint``:
    the results sent and the records so far) and a rerun continues after the last one saved: the
    clients and the server model replay the results sent, as a client that missed rounds catches up,
    and every later round trains exactly as it would have (seeds depend on the round, not the process).
    """
    variant = Variant(cfg, live_clients)
    rounds = cfg.federation.rounds
    due = set(range(1, rounds + 1) if eval_rounds is None else eval_rounds)
    records = variant.resume(checkpoint) if checkpoint is not None else []
    if variant.rules.needs_init and not variant.server.history:
        variant.begin()
    for t in range(len(records) + 1, rounds + 1):
        result, record = variant.round(t, round_one)
        if on_result is not None:
            on_result(t, result)
        if t in due:
            model = variant.server.model
            assert model is not None
            record["eval"] = evaluate(model.model, model.tokenizer)
        log.info("%s round %d: %s", cfg.aggregation.method, t,
                 {k: record[k] for k in ("rank_total", "bytes_up", "bytes_down", "round_error")})  # fmt: skip
        records.append(record)
        if checkpoint is not None:
            variant.save(checkpoint, records)
    return records


def shared_round_one(cfg: FloristConfig) -> list[ClientUpdate]:
    """Round 1's raw uploads from the base model (no uplink cut, float32), for variants that share it."""
    fed = replace(cfg.federation, uplink_tau=None, wire_dtype="float32")
    shared = replace(cfg, federation=fed)
    clients = [make_client(shared, ClientProtocol.MERGE_AND_RESTART, k) for k in range(fed.num_clients)]
    updates, _ = train_round(clients, 1)
    return updates
