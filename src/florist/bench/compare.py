"""``florist bench``: every method on the same clients, data, seeds and local budget, per round.

    florist bench [--out docs/results/paper-cpu] [--taus 1.0,0.95,...] [section.key=value ...]

Two rank settings: homogeneous (the config's ``lora.ranks``, r = 16, alpha 32 on q_proj, v_proj) and
heterogeneous (ranks 64, 32, 16, 16, 8, 8, 4, 4 with alpha = 2 r). Round 1 is trained once per
setting and shared (see simulate.py); FFA-LoRA trains its own. Held-out loss is scored after every
round, MMLU after the last. FLoRIST-O is the tau with the lowest final held-out loss; FLoRIST-E is
the tau with the fewest downloaded bytes whose final held-out loss is within ``--e-tolerance`` of O's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from florist.aggregation import make_aggregator
from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.bench import report
from florist.bench.simulate import run_variant, shared_round_one
from florist.bench.variants import DEFAULT_TAUS, Variant, budget, sweep
from florist.client.model import load_model
from florist.config import RunConfig, load_config
from florist.data.federated import test_examples
from florist.flower.evaluation import Evaluator
from florist.fsutil import write_json_atomic, write_text_atomic
from florist.lora import ClientUpdate

log = logging.getLogger(__name__)
PAPER_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "paper_cpu.toml")
HETERO = (64, 32, 16, 16, 8, 8, 4, 4)


@dataclass(frozen=True)
class BenchOptions:
    config: str = PAPER_CONFIG
    overrides: tuple[str, ...] = ()
    out: str = "runs/bench"
    taus: tuple[float, ...] = DEFAULT_TAUS
    hetero_taus: tuple[float, ...] = (1.0, 0.9, 0.8)
    budget_match_tau: float = 0.9
    e_tolerance: float = 0.01
    settings: tuple[str, ...] = ("homogeneous", "heterogeneous")


def setting_config(opts: BenchOptions, setting: str) -> RunConfig:
    cfg = load_config(opts.config, list(opts.overrides))
    if setting == "heterogeneous":
        n = cfg.federation.num_clients
        ranks = (HETERO * n)[:n] if n != len(HETERO) else HETERO
        cfg = replace(cfg, lora=replace(cfg.lora, ranks=tuple(ranks), alpha=None, alpha_ratio=2.0))
    return cfg


def variant_config(cfg: RunConfig, v: Variant) -> RunConfig:
    agg = replace(cfg.aggregation, method=v.method, tau=v.tau, budget_mb=v.budget_mb, rank=None)
    return replace(cfg, aggregation=agg)


def round_one_key(cfg: RunConfig, method: str) -> str | None:
    """Which round-1 uploads ``method`` can share: its clients' init ('shared' or 'per_client').

    Round 1 starts every client from the base model with a fresh LoRA: merge-protocol clients draw A
    by ``lora.init``, continue-protocol clients from the shared draw (FedAvg). FFA-LoRA trains B
    only from its own frozen A and shares nothing (None).
    """
    protocol = make_aggregator(method).protocol
    if protocol is ClientProtocol.FROZEN_SHARED_A:
        return None
    return cfg.lora.init if protocol is ClientProtocol.MERGE_AND_RESTART else "shared"


def matched_budget_mb(cfg: RunConfig, round_one: list[ClientUpdate], tau: float) -> float:
    """Download bytes of FLoRIST at ``tau`` on round 1's shared uploads, in MB (the budget to match)."""
    from florist.aggregation import communication

    agg_cfg = variant_config(cfg, Variant("", "florist", tau=tau)).aggregation
    result = make_aggregator("florist", **agg_cfg.options().aggregator_options()).aggregate(round_one)
    return communication(round_one[:1], result).downlink_total / 1e6


class Bench:
    """One comparison: settings x variants, results gathered for the report."""

    def __init__(self, opts: BenchOptions) -> None:
        self.opts, self.out = opts, Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.round_one_results: dict[str, AggregationResult] = {}

    def evaluators(self, cfg: RunConfig) -> tuple[Evaluator, Evaluator]:
        test = test_examples(cfg.data)
        per_round = Evaluator(replace(cfg.eval, mmlu=None), test, cfg.data.seed, cfg.run.progress)
        return per_round, Evaluator(cfg.eval, test, cfg.data.seed, cfg.run.progress)

    def run_setting(self, setting: str) -> None:
        cfg = setting_config(self.opts, setting)
        per_round, last = self.evaluators(cfg)
        rounds = cfg.federation.rounds
        round_one: dict[str, list[ClientUpdate]] = {}
        taus = self.opts.taus if setting == "homogeneous" else self.opts.hetero_taus
        variants = sweep(taus=taus)
        round_one[cfg.lora.init] = shared_round_one(cfg)  # florist's, for the matched budget
        mb = matched_budget_mb(cfg, round_one[cfg.lora.init], self.opts.budget_match_tau)
        variants.append(budget(mb, f"tau={self.opts.budget_match_tau:.2f} round-1 bytes"))
        model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        base_eval = last(model.to(cfg.model.torch_device()), tok)  # the same questions as the last round
        del model
        self.results[setting] = {report.BASE: [{"round": 0, "eval": base_eval}]}
        for v in variants:
            counter = {"round": 0}

            def evaluate(model: Any, tok: Any, counter: dict[str, int] = counter) -> dict[str, float]:
                counter["round"] += 1
                return (last if counter["round"] == rounds else per_round)(model, tok)

            def keep(t: int, result: AggregationResult, name: str = v.name) -> None:
                if t == 1:
                    self.round_one_results[f"{setting}/{name}"] = result

            start = time.perf_counter()
            key = round_one_key(cfg, v.method)
            if key and key not in round_one:
                log.info(
                    "%s: training round 1 once for the variants that start from the %s init", setting, key
                )
                round_one[key] = shared_round_one(replace(cfg, lora=replace(cfg.lora, init=key)))
            records = run_variant(variant_config(cfg, v), evaluate, round_one.get(key) if key else None, keep)
            log.info("%s / %s done in %.0f s", setting, v.name, time.perf_counter() - start)
            self.results[setting][v.name] = records
            write_json_atomic(self.out / "results.json", self.results)  # progress survives a crash

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        for setting in self.opts.settings:
            self.run_setting(setting)
        summary = self.write_report()
        summary["seconds"] = time.perf_counter() - start
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def write_report(self) -> dict[str, Any]:
        parts, picks = [], {}
        for setting, results in self.results.items():
            rows = report.table_rows(results)
            picks[setting] = pick_o_e(rows, self.opts.e_tolerance)
            parts.append(report.markdown_table(rows, f"{setting} ranks"))
            parts.append(picks_text(picks[setting], self.opts.e_tolerance))
            report.plot_accuracy_bytes(rows, self.out / f"accuracy_bytes_{setting}.png", f"{setting} ranks")
        parts.append(self.layer_section())
        write_text_atomic(self.out / "table.md", "\n".join(parts))
        return {"picks": picks, "out": str(self.out)}

    def layer_section(self) -> str:
        florist_r1 = {
            k: r for k, r in self.round_one_results.items() if "tau=" in k and k.startswith("homogeneous/")
        }
        if not florist_r1:
            return ""
        report.plot_rank_heatmaps(
            {k.split("/", 1)[1]: r.ranks for k, r in florist_r1.items()}, self.out / "ranks_heatmap.png"
        )
        exact = next((r for k, r in florist_r1.items() if "tau=1.00" in k), next(iter(florist_r1.values())))
        if exact.spectra:
            names = sorted(exact.spectra)
            chosen = [names[0], names[1], names[len(names) // 2], names[-2], names[-1]]
            report.plot_spectra(
                {n: exact.spectra[n].tolist() for n in chosen},
                self.out / "spectrum.png",
                "round 1, homogeneous",
            )
        return layerwise_text(florist_r1)


def pick_o_e(rows: Sequence[dict[str, Any]], tolerance: float) -> dict[str, str | None]:
    taus = [r for r in rows if r["method"].startswith("FLoRIST tau=") and r["heldout_loss"] is not None]
    if not taus:
        return {"O": None, "E": None}
    best = min(taus, key=lambda r: r["heldout_loss"])
    ok = [r for r in taus if r["heldout_loss"] <= best["heldout_loss"] + tolerance]
    return {"O": best["method"], "E": min(ok, key=lambda r: r["download_bytes"])["method"]}


def picks_text(picks: dict[str, str | None], tolerance: float) -> str:
    return (
        f"\nFLoRIST-O (lowest final held-out loss): **{picks['O']}**; FLoRIST-E (fewest downloaded bytes "
        f"with a final held-out loss within {tolerance} of O's): **{picks['E']}**.\n"
    )


def layerwise_text(results: dict[str, AggregationResult]) -> str:
    lines = [
        "### Rank kept per layer (round 1, homogeneous ranks)\n",
        "| variant | layers | q_proj mean | v_proj mean | first third | middle third | last third |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        layers, modules, grid = report.rank_grid(r.ranks)
        by_mod = {m: sum(row) / len(row) for m, row in zip(modules, grid, strict=True)}
        col = [sum(grid[i][j] for i in range(len(modules))) / len(modules) for j in range(len(layers))]
        third = max(1, len(col) // 3)
        lines.append(
            f"| {key.split('/', 1)[1]} | {len(layers)} | {by_mod.get('q_proj', float('nan')):.2f} | "
            f"{by_mod.get('v_proj', float('nan')):.2f} | {mean(col[:third]):.2f} | "
            f"{mean(col[third:-third]):.2f} | {mean(col[-third:]):.2f} |"
        )
    return "\n".join(lines) + "\n"


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
