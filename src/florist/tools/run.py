"""``florist run CONFIG.toml [section.key=value ...]``: a federation on Flower's simulation runtime.

The ServerApp runs in this process; each client node runs the ClientApp in a Ray actor that keeps
its model loaded across rounds. The same apps run under ``flwr run`` and on a deployment (README).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from florist.config import RunConfig

log = logging.getLogger(__name__)


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: each client gets ``cpus_per_client`` cores (at most all of them) and its GPU share."""
    cores = os.cpu_count() or 1
    cpus = min(float(cores), cfg.federation.cpus_per_client)
    resources: dict[str, Any] = {"num_cpus": cpus, "num_gpus": cfg.federation.gpus_per_client}
    return {"client_resources": resources, "init_args": {"num_cpus": cores, "log_to_driver": True}}


def run_simulation(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` to the end; returns the summary that RUN/summary.json also holds."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from florist.flower.client_app import make_client_app
    from florist.flower.server_app import make_server_app

    if cfg.run.resume:  # refuse a changed config or a missing checkpoint before Ray starts
        from florist.server.checkpoint import load_latest

        load_latest(Path(cfg.run.dir) / str(cfg.run.name) / "checkpoints", cfg, cfg.run.force)
    summary: dict[str, Any] = {}
    errors: list[BaseException] = []
    flwr_run_simulation(
        server_app=make_server_app(cfg, on_summary=summary.update, on_error=errors.append),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
    )
    if errors:
        raise errors[0]
    if not summary:
        raise RuntimeError("the federation stopped before it finished; the log above says why")
    return summary


DEMO_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.toml")


def print_summary(summary: dict[str, Any], demo: bool = False, console: Any = None) -> None:
    """Per-round table, before/after, bytes, and where the adapter is and how to load it."""
    from florist.tools.tables import make_console

    console = console or make_console()
    records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    console.print(rounds_table(records, summary["method"]))
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for key in ("exact_match", "heldout_loss", "mmlu_micro", "mmlu_macro"):
        if key in before or key in after:
            console.print(f"{key:>14}: before {_fmt(before.get(key))}  after {_fmt(after.get(key))}")
    console.print(bytes_line(summary))
    if "precision" in summary:
        p = summary["precision"]
        same = p["train"] == p["eval"]
        console.print(f"precision: {p['train']} for training and evaluation" if same
                      else f"precision: training {p['train']}; evaluation {p['eval']}")  # fmt: skip
    for r in records:
        if r["round"] > 0 and (r.get("skipped") or r.get("rejected") or r.get("timed_out")):
            console.print(reliability_line(r))
    sync = summary["sync"]
    if sync.get("clients_match_server"):
        console.print(
            f"all {len(sync['digests'])} clients hold the server's merged weights (sha256 digests agree)"
        )
    console.print(f"run directory: {summary['run_dir']}  (metrics.jsonl, config.toml, rounds/, summary.json)")
    console.print(f"global adapter (PEFT): {summary['adapter']}")
    console.print(load_snippet(summary["base_model"], summary["adapter"]))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rounds_table(records: list[dict[str, Any]], method: str) -> Any:
    from rich.table import Table

    from florist.tools.tables import human_bytes

    table = Table(title=f"{method}: one row per round")
    for col in (
        "round",
        "clients",
        "train loss",
        "global rank",
        "uplink",
        "downlink",
        "catch-up",
        "EM",
        "held-out loss",
    ):
        table.add_column(col, justify="right")
    for r in records:
        ev = r.get("eval", {})
        if r["round"] == 0:
            table.add_row(
                "0 (base)", "", "", "", "", "", "", _fmt(ev.get("exact_match")), _fmt(ev.get("heldout_loss"))
            )
            continue
        if "skipped" in r:
            table.add_row(str(r["round"]), "skipped", "", "", human_bytes(r["bytes_up"]),
                          human_bytes(r["bytes_down"]), human_bytes(r["bytes_catchup"]), "", "")  # fmt: skip
            continue
        table.add_row(
            str(r["round"]), str(len(r["clients"])), _fmt(r["train_loss"]), str(r["rank_total"]),
            human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"]), human_bytes(r["bytes_catchup"]),
            _fmt(ev.get("exact_match")), _fmt(ev.get("heldout_loss")),
        )  # fmt: skip
    return table


def reliability_line(r: dict[str, Any]) -> str:
    """What went wrong in a round: skipped (why), clients left out (why), clients too slow."""
    parts = [f"round {r['round']}:"]
    if r.get("skipped"):
        parts.append(f"skipped ({r['skipped']})")
    parts += [f"{who} left out ({why})" for who, why in (r.get("rejected") or {}).items()]
    if r.get("timed_out"):
        parts.append(f"no reply in time from {', '.join(r['timed_out'])}")
    return " ".join(parts)


def bytes_line(summary: dict[str, Any]) -> str:
    from florist.tools.tables import human_bytes

    up, down = human_bytes(summary["bytes_up"]), human_bytes(summary["bytes_down"])
    return (
        f"bytes sent: uplink {up}, downlink {down} "
        f"(of which catch-up for skipped rounds {human_bytes(summary['bytes_catchup'])}; "
        f"includes the final sync of every client)"
    )


def load_snippet(base: str, adapter: str) -> str:
    return (
        "load it with peft:\n"
        "  from transformers import AutoModelForCausalLM\n  from peft import PeftModel\n"
        f"  base = AutoModelForCausalLM.from_pretrained({base!r})\n"
        f"  model = PeftModel.from_pretrained(base, {adapter!r}).merge_and_unload()"
    )


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"
