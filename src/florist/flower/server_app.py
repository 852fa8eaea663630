"""The Flower ServerApp: hello, T rounds of train + aggregate + evaluate, a final sync, the run dir.

flwr run / deployment:   serverapp = "florist.flower.server_app:app"  (config from the run config)
florist run:             make_server_app(cfg)
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from florist.aggregation import make_aggregator
from florist.aggregation.comm import efficiency
from florist.client.model import load_model, resolve_model
from florist.config import RunConfig
from florist.config.loader import from_run_config
from florist.data.federated import test_examples
from florist.flower.evaluation import Evaluator
from florist.flower.global_model import GlobalModel
from florist.flower.rundir import RunDir, cumulative
from florist.flower.strategy import ClientInfo, FederatedLoRA, RoundLog, short_reason, weighted_mean

log = logging.getLogger(__name__)


def hello(grid: Grid, cfg: RunConfig) -> list[ClientInfo]:
    """Ask every node who it is; wait until ``federation.num_clients`` nodes are connected."""
    nodes = wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.timeout)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=f"{MessageType.QUERY}.hello") for n in nodes]
    infos = []
    for reply in grid.send_and_receive(msgs, timeout=cfg.federation.timeout):
        if reply.has_error():
            reason = short_reason(reply.error.reason)
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: {reason}")
        c: dict[str, Any] = dict(reply.content.config_records["client"])
        node = reply.metadata.src_node_id
        infos.append(
            ClientInfo(node, str(c["client_id"]), int(c["index"]), int(c["rank"]), int(c["num_examples"]))
        )
    indices = sorted(i.index for i in infos)
    if indices != list(range(cfg.federation.num_clients)):
        raise RuntimeError(
            f"nodes report client indices {indices}; expected 0..{cfg.federation.num_clients - 1}"
        )
    return infos


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {n} nodes connected within {timeout:.0f} s")
        time.sleep(0.5)
    return sorted(nodes)[:n]


class Federation:
    """One run: the strategy, the server's global model, evaluation and the run directory."""

    def __init__(self, cfg: RunConfig, grid: Grid) -> None:
        self.cfg, self.grid = cfg, grid
        self.aggregator = make_aggregator(
            cfg.aggregation.method, **cfg.aggregation.options().aggregator_options()
        )
        self.base = resolve_model(cfg.model.name)
        self.rundir = RunDir(cfg, self.base)
        self.strategy = FederatedLoRA(cfg, self.aggregator, hello(grid, cfg))
        self.strategy.summary()
        model, tokenizer = load_model(self.base, cfg.model.torch_dtype())
        self.model = GlobalModel(model.to(cfg.model.torch_device()), tokenizer, self.aggregator.protocol)
        self.evaluator = Evaluator(cfg.eval, test_examples(cfg.data), cfg.data.seed, cfg.run.progress)
        self.records: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        if self.evaluator.due(0, self.cfg.federation.rounds):
            self._record({"round": 0, "eval": self.evaluator(self.model.model, self.model.tokenizer)})
        for t in range(1, self.cfg.federation.rounds + 1):
            self.round(t)
        sync = self.sync()
        return self.finish(sync)

    def round(self, t: int) -> None:
        start = time.perf_counter()
        msgs = list(self.strategy.configure_train(t, _EMPTY_ARRAYS(), ConfigRecord(), self.grid))
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.federation.timeout))
        wall = time.perf_counter() - start
        self.strategy.aggregate_train(t, replies)
        _, result = self.strategy.history[-1]
        self.model.apply_result(t, result)
        self.rundir.global_adapter(t, result.global_update)
        log_ = self.strategy.logs[t]
        if self.cfg.run.save_client_updates:
            self.rundir.client_updates(t, self.strategy.last_updates)
        record = round_record(log_, result, wall)
        if self.evaluator.due(t, self.cfg.federation.rounds):
            record["eval"] = self.evaluator(self.model.model, self.model.tokenizer)
        record["round_seconds"] = time.perf_counter() - start
        self._record(record)

    def sync(self) -> dict[str, Any]:
        """Send every node what it is missing; check that all hold the same weights as the server."""
        log_ = RoundLog(self.cfg.federation.rounds + 1)
        nodes = [c.node_id for c in self.strategy.clients]
        msgs = self.strategy.messages(log_.round, nodes, f"{MessageType.QUERY}.sync", log_)
        digests = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.cfg.federation.timeout):
            info = self.strategy.by_node[reply.metadata.src_node_id]
            if reply.has_error():
                log.warning("sync: %s failed: %s", info.client_id, short_reason(reply.error.reason))
                continue
            digests[info.client_id] = str(reply.content.config_records["client"]["digest"])
        names = sorted(self.strategy.history[-1][1].global_update)
        server = self.model.digest(names)
        same = self.strategy.merges and all(d == server for d in digests.values())
        if self.strategy.merges and not same:
            log.warning("sync: client weights differ from the server's: %s vs %s", digests, server)
        return {"bytes_down": log_.bytes_down, "bytes_catchup": log_.bytes_catchup, "digests": digests,
                "server_digest": server, "clients_match_server": same}  # fmt: skip

    def finish(self, sync: dict[str, Any]) -> dict[str, Any]:
        history = [r.global_update for _, r in self.strategy.history]
        adapter = self.rundir.final_adapter(cumulative(history, self.strategy.merges))
        rounds = [r for r in self.records if r["round"] > 0]
        summary = {
            "run_dir": str(self.rundir.path),
            "adapter": str(adapter),
            "base_model": self.base,
            "method": self.aggregator.name,
            "rounds": len(rounds),
            "eval_before": next((r["eval"] for r in self.records if r["round"] == 0), None),
            "eval_after": next((r["eval"] for r in reversed(rounds) if "eval" in r), None),
            **byte_totals(rounds, sync),
            "sync": sync,
        }
        self.rundir.summary(summary)
        return summary

    def _record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.rundir.append_metrics(record)


def _EMPTY_ARRAYS() -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord()


def byte_totals(rounds: list[dict[str, Any]], sync: dict[str, Any]) -> dict[str, int]:
    """Whole-run bytes: every round plus the final sync; downlink includes catch-up."""
    catchup = sum(r["bytes_catchup"] for r in rounds) + sync["bytes_catchup"]
    down = sum(r["bytes_down"] for r in rounds) + sync["bytes_down"] + catchup
    return {"bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": down, "bytes_catchup": catchup}


def round_record(log_: RoundLog, result: Any, wall: float) -> dict[str, Any]:
    """The metrics.jsonl line of one round (eval added by the caller)."""
    train_s = [m.get("train_seconds", 0.0) for m in log_.client_metrics.values()]
    return {
        "round": log_.round,
        "clients": log_.clients,
        "train_loss": weighted_mean(log_.client_metrics, "train_loss"),
        "bytes_up": log_.bytes_up,
        "bytes_down": log_.bytes_down,
        "bytes_catchup": log_.bytes_catchup,
        "ranks": result.ranks,
        "rank_total": sum(result.ranks.values()),
        "efficiency_e-4": efficiency(result),
        "energy_kept_min": min(result.energy_kept.values()) if result.energy_kept else None,
        "aggregation_seconds": result.seconds,
        "train_seconds_sum": sum(train_s),
        "train_and_transport_seconds": wall,
        "client_metrics": log_.client_metrics,
        "rejected": log_.rejected,
    }


def run_federation(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run the whole federation on ``grid``; returns the summary (also in RUN/summary.json)."""
    return Federation(cfg, grid).run()


def make_server_app(cfg: RunConfig | None = None, on_summary: Any = None, on_error: Any = None) -> ServerApp:
    """A ServerApp for ``cfg`` (None: from the run config); callbacks receive the summary or the error."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_federation(grid, cfg if cfg is not None else from_run_config(context.run_config))
        except BaseException as err:
            if on_error is None:
                raise
            on_error(err)
            return
        if on_summary is not None:
            on_summary(summary)

    return app


app = make_server_app()
