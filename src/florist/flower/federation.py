"""One federated run on the server: rounds, skipped rounds, checkpoints, resume, the final sync.

Round t:  sample -> send (each message size-checked) -> collect replies until federation.round_timeout
          (later ones are left out; a reply that arrives in a later round is logged and discarded)
          -> strategy.aggregate_train (bad replies left out; fewer than min_replies: round skipped,
          except under client-level DP, which releases the noise alone)
          -> fold into the server's global model -> metrics line -> checkpoint RUN/checkpoints/round-t.pt
After max_skipped_rounds consecutive skipped rounds the run stops with ``QuorumLost`` (non-zero exit);
its checkpoint is on disk and ``run.resume = true`` continues from it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp import Grid

from florist.aggregation.comm import efficiency, wire_bytes
from florist.client.model import load_model, published_name, resolve_model
from florist.config import FloristConfig
from florist.data.federated import test_examples
from florist.errors import FederationError, QuorumLost
from florist.flower.exchange import Exchange
from florist.flower.handshake import hello
from florist.flower.replies import RoundLog, short_reason, weighted_mean
from florist.flower.strategy import FederatedLoRA
from florist.precision import resolve
from florist.server import checkpoint
from florist.server.evaluation import Evaluator
from florist.server.federation import Server
from florist.server.global_model import GlobalModel, adapted_shapes
from florist.server.rundir import RunDir
from florist.server.size_guard import check_estimate, estimate

log = logging.getLogger(__name__)
DRAIN_SECONDS = 60.0  # at the end, wait at most this long (or round_timeout) for replies still owed


class Federation:
    """One run: the strategy, the server's global model, evaluation, checkpoints and the run directory."""

    def __init__(self, cfg: FloristConfig, grid: Grid) -> None:
        self.cfg, self.grid = cfg, grid
        self.aggregator = cfg.aggregator()
        self.base = resolve_model(cfg.model.name)
        self.rundir = RunDir(cfg, published_name(cfg.model.name))
        resumed = (
            checkpoint.load_latest(self.rundir.checkpoints, cfg, cfg.run.force) if cfg.run.resume else None
        )
        model, tokenizer = load_model(self.base, cfg.model.torch_dtype())
        self.expected = adapted_shapes(model, cfg.lora.target_modules)
        self.preflight()
        self.model = GlobalModel(
            model.to(cfg.model.torch_device()), tokenizer, self.aggregator.protocol, cfg.held_updates()
        )
        clients = hello(grid, cfg)
        self.server = Server(cfg, self.aggregator, clients, self.model)
        self.strategy = FederatedLoRA(cfg, self.aggregator, clients, self.expected, self.server)
        self.strategy.summary()
        self.evaluator = Evaluator(cfg.eval, test_examples(cfg.data), cfg.data.seed, cfg.run.progress)
        self.rundir.create()  # only now: a bad model or data source leaves no directory behind
        self.exchange = Exchange(grid)
        self.resumed = resumed

    def preflight(self) -> None:
        """Refuse a configuration whose messages cannot fit under federation.max_message_mb."""
        fed, agg, n = self.cfg.federation, self.cfg.aggregation, self.cfg.federation.num_clients
        ranks = self.cfg.lora.client_ranks(n)
        est = estimate(agg.method, self.expected, ranks, agg.rank, agg.budget_mb, wire_bytes(fed.wire_dtype))
        warning = check_estimate(est, agg.method, fed.max_message_mb, n)
        if warning:
            log.warning(warning)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        if self.cfg.run.resume:
            self.resume()
        else:
            if self.evaluator.due(0, self.cfg.federation.rounds):
                self._record({"round": 0, "eval": self.evaluator(self.model.model, self.model.tokenizer)})
            self.strategy.initialise(self.grid)  # round 0, for a protocol that needs one
            self.checkpoint(0)
        for t in range(self.server.state.round + 1, self.cfg.federation.rounds + 1):
            self.round(t)
        sync = self.sync()
        self.exchange.drain(min(self._round_timeout(), DRAIN_SECONDS))
        return self.finish(sync)

    def round(self, t: int) -> None:
        start = time.perf_counter()
        msgs = list(self.strategy.configure_train(t, ArrayRecord(), ConfigRecord(), self.grid))
        replies, missing = self.exchange.send_and_receive(msgs, t, self._round_timeout(), f"round {t}")
        log_ = self.strategy.round_log(t)
        log_.timed_out = [self.strategy.client_of(n) for n in missing]
        for who in log_.timed_out:
            log.warning("round %d: %s left out: no reply within %.0f s", t, who, self._round_timeout())
        wall = time.perf_counter() - start
        self.strategy.aggregate_train(t, replies)
        if log_.skipped is not None:
            self._skipped(t, log_, start)
            return
        result = self.server.latest()
        self.rundir.global_adapter(t, result.global_update)
        if self.cfg.run.save_client_updates and self.server.last is not None:
            self.rundir.client_updates(t, self.server.last.updates)
        record = round_record(log_, result, wall) | self._spent(t)
        if self.evaluator.due(t, self.cfg.federation.rounds):
            record["eval"] = self.evaluator(self.model.model, self.model.tokenizer)
        record["round_seconds"] = time.perf_counter() - start
        self._record(record)
        self.checkpoint(t)

    def _skipped(self, t: int, log_: RoundLog, start: float) -> None:
        self._record(skipped_record(log_) | self._spent(t) | {"round_seconds": time.perf_counter() - start})
        self.checkpoint(t)
        limit = self.cfg.federation.max_skipped_rounds
        streak = self.server.state.skipped_streak
        if streak >= limit:
            raise QuorumLost(
                f"round {t}: {streak} consecutive rounds skipped "
                f"(federation.max_skipped_rounds = {limit}); last: {log_.skipped}. "
                f"Checkpoint written; continue with run.resume=true (florist run ... --resume)"
            )

    def _round_timeout(self) -> float:
        fed = self.cfg.federation
        return fed.round_timeout if fed.round_timeout is not None else fed.timeout

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, t: int) -> None:
        self.server.state.round = t
        checkpoint.save(self.rundir.checkpoints, self.server.state, self.cfg, self.cfg.run.checkpoint_keep)

    def resume(self) -> None:
        """Continue after the checkpoint read at start: history, model, metrics, what clients hold."""
        assert self.resumed is not None
        self.server.restore(self.resumed)
        state = self.server.state
        self.rundir.restore(state.round, state.records)
        restore = self.restore_clients()
        log.info("resumed after round %d; clients restored with %d bytes", state.round, restore)

    def restore_clients(self) -> int:
        """Bring every node back to what it held at the checkpoint (merge protocols; a no-op otherwise)."""
        msgs = self.strategy.restore_messages(self.server.state.round + 1)
        if not msgs:
            return 0
        replies, missing = self.exchange.send_and_receive(msgs, 0, self.cfg.federation.timeout, "restore")
        failed = [short_reason(r.error.reason) for r in replies if r.has_error()]
        if failed or missing:
            raise FederationError(f"restoring clients failed: {failed or f'no reply from nodes {missing}'}")
        return self.strategy.restored_bytes()

    # ------------------------------------------------------------------ the end

    def sync(self) -> dict[str, Any]:
        """Send every node what it is missing; check that all hold the same weights as the server."""
        log_ = RoundLog(self.cfg.federation.rounds + 1)
        nodes = self.strategy.node_ids()
        msgs = self.strategy.messages(log_.round, nodes, f"{MessageType.QUERY}.sync", log_)
        replies, missing = self.exchange.send_and_receive(
            msgs, log_.round, self.cfg.federation.timeout, "sync"
        )
        digests = {}
        for reply in replies:
            info = self.strategy.info(reply.metadata.src_node_id)
            if info is None:
                log.warning(
                    "sync: a reply from node %s, which did not join, is ignored", reply.metadata.src_node_id
                )
                continue
            if reply.has_error():
                log.warning("sync: %s failed: %s", info.client_id, short_reason(reply.error.reason))
                continue
            digest = sync_digest(reply)
            if digest is None:
                log.warning("sync: %s sent no usable digest; its weights count as unchecked", info.client_id)
                continue
            digests[info.client_id] = digest
        names = sorted(self.expected)
        server = self.model.digest(names)
        # None where the method merges nothing into the clients' weights (nothing to compare)
        same = (
            len(digests) == len(nodes) and all(d == server for d in digests.values())
            if self.strategy.merges
            else None
        )
        if self.strategy.merges and not same:
            log.warning(
                "sync: client weights differ from the server's (or are missing): %s vs %s", digests, server
            )
        return {"bytes_down": log_.bytes_down, "bytes_catchup": log_.bytes_catchup, "digests": digests,
                "server_digest": server, "clients_match_server": same,
                "no_reply": [self.strategy.client_of(n) for n in missing]}  # fmt: skip

    def finish(self, sync: dict[str, Any]) -> dict[str, Any]:
        records = self.server.state.records
        if not self.server.history:  # every round skipped: say why, exit non-zero
            skipped = [r for r in records if "skipped" in r]
            last = skipped[-1]["skipped"] if skipped else "no round ran"
            raise QuorumLost(
                f"no round was aggregated ({len(skipped)} skipped), so there is no adapter to write; "
                f"the last round: {str(last)[:300]}"
            )
        adapter = self.rundir.final_adapter(self.server.final_adapter())
        rounds = [r for r in records if r["round"] > 0]
        late = [
            {
                "round": x.round,
                "client": self.strategy.client_of(x.node_id),
                "arrived_in": x.arrived_in,
            }
            for x in self.exchange.late
        ]
        summary = {
            "run_dir": str(self.rundir.path),
            "adapter": str(adapter),
            "base_model": self.base,
            "published_base": self.rundir.base_model,  # as other tools know it (the adapter names it)
            "method": self.aggregator.name,
            "rounds": len([r for r in rounds if "skipped" not in r]),
            "rounds_skipped": [r["round"] for r in rounds if "skipped" in r],
            "eval_before": next((r["eval"] for r in records if r["round"] == 0), None),
            "eval_after": next((r["eval"] for r in reversed(rounds) if "eval" in r), None),
            **byte_totals(rounds, sync),
            "late_replies": late,
            "sync": sync,
            "precision": self.precision(),
            **privacy_summary(self.cfg, len(rounds)),
        }
        self.rundir.summary(summary)
        return summary

    def precision(self) -> dict[str, str]:
        """What ``auto`` meant here (clients on other machines decide for themselves and log it)."""
        device = self.cfg.model.torch_device()
        return {
            "train": resolve(self.cfg.train.precision, device).describe(),
            "eval": resolve(self.cfg.eval.precision, device).describe(),
        }

    def _spent(self, t: int) -> dict[str, float]:
        """Client-level DP: the epsilon spent after round ``t``, a skipped round included (its sample
        was drawn; the accountant composes every round)."""
        acc = self.cfg.accountant()
        return {} if acc is None else {"epsilon": acc.epsilon(t)}

    def _record(self, record: dict[str, Any]) -> None:
        self.server.state.records.append(record)
        self.rundir.append_metrics(record)


def privacy_summary(cfg: FloristConfig, rounds: int) -> dict[str, Any]:
    """Client-level DP's guarantee for the run (empty without it)."""
    acc = cfg.accountant()
    if acc is None:
        return {}
    spent = {"epsilon": acc.epsilon(rounds), "delta": acc.delta, "noise_multiplier": acc.sigma}
    return {"privacy": {"mode": cfg.privacy.mode, **spent, "clip": cfg.privacy.clip, "sample_rate": acc.q}}


def sync_digest(reply: Any) -> str | None:
    """The sha256 hex digest in a sync reply, or None when it is missing or is not one."""
    try:
        digest = reply.content.config_records["client"]["digest"]
    except (KeyError, TypeError, AttributeError):
        return None
    if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


def byte_totals(rounds: list[dict[str, Any]], sync: dict[str, Any]) -> dict[str, int]:
    """Whole-run bytes: every round plus the final sync; downlink includes catch-up."""
    catchup = sum(r["bytes_catchup"] for r in rounds) + sync["bytes_catchup"]
    down = sum(r["bytes_down"] for r in rounds) + sync["bytes_down"] + catchup
    return {"bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": down, "bytes_catchup": catchup}


def skipped_record(log_: RoundLog) -> dict[str, Any]:
    """The metrics.jsonl line of a skipped round: who was asked, who failed, why."""
    return {
        "round": log_.round,
        "clients": log_.clients,
        "skipped": log_.skipped,
        "bytes_up": log_.bytes_up,
        "bytes_down": log_.bytes_down,
        "bytes_catchup": log_.bytes_catchup,
        "rejected": log_.rejected,
        "timed_out": log_.timed_out,
    }


def round_record(log_: RoundLog, result: Any, wall: float) -> dict[str, Any]:
    """The metrics.jsonl line of one round (eval added by the caller)."""
    train_s = [m.get("train_seconds", 0.0) for m in log_.client_metrics.values()]
    return {
        "round": log_.round,
        "clients": log_.clients,
        "aggregated": list(result.client_ids),
        "train_loss": weighted_mean(log_.client_metrics, "train_loss"),
        "bytes_up": log_.bytes_up + log_.bytes_init_up,
        "bytes_down": log_.bytes_down,
        "bytes_catchup": log_.bytes_catchup,
        **({"init_bytes_up": log_.bytes_init_up} if log_.bytes_init_up else {}),
        "ranks": result.ranks,
        "rank_total": sum(result.ranks.values()),
        "efficiency_e-4": efficiency(result),
        "energy_kept_min": min(result.energy_kept.values()) if result.energy_kept else None,
        "aggregation_seconds": result.seconds,
        "train_seconds_sum": sum(train_s),
        "train_and_transport_seconds": wall,
        "client_metrics": log_.client_metrics,
        "rejected": log_.rejected,
        "timed_out": log_.timed_out,
        "clip": log_.clip,
    }
