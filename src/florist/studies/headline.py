"""``florist bench``: every method on the same clients, data, seeds and local budget; total bytes
against the final held-out loss, paired.

    florist bench [--out docs/results/headline] [--taus 0.95,0.9,0.8] [--option-taus 0.9] [k=v ...]

Two rank settings: homogeneous (the config's ``lora.ranks``) and heterogeneous (ranks 64, 32, 16, 16,
8, 8, 4, 4 with alpha = 2 r). Round 1 is trained once per setting and init (see simulate.py) and its
raw uploads cached on disk; FFA-LoRA trains its own. Every variant's global model is scored after the
last round on the same held-out rows, and compared with FLoRA's row by row (``florist.eval.paired``).

Each variant is written to ``results.json`` as soon as it is done and skipped on a rerun with the same
``--out``, so a killed bench continues where it stopped (the round-1 uploads come back from the cache).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from florist.aggregation import communication, make_aggregator
from florist.aggregation.base import AggregationResult
from florist.aggregation.protocols import protocol_of
from florist.cli_parsing import floats, ints, names, study_arguments
from florist.client.model import load_model
from florist.config import PAPER_CONFIG, FloristConfig, load_config
from florist.config.loader import build, set_dotted
from florist.data.federated import test_examples, validation_examples
from florist.errors import ConfigError
from florist.fsutil import write_json_atomic, write_text_atomic
from florist.lora import ClientUpdate
from florist.server.evaluation import Evaluator
from florist.studies import report
from florist.studies.fair import write_fair_report
from florist.studies.full import METHOD as FULL
from florist.studies.full import run_full_variant
from florist.studies.provenance import check_meta
from florist.studies.round_one_cache import RoundOneCache
from florist.studies.simulate import Evaluate, run_variant
from florist.studies.variants import DEFAULT_TAUS, Variant, budget, check_options, parse_baseline, sweep

log = logging.getLogger(__name__)
HETERO = (64, 32, 16, 16, 8, 8, 4, 4)


@dataclass(frozen=True)
class BenchOptions:
    config: str = PAPER_CONFIG
    overrides: tuple[str, ...] = ()
    out: str = "runs/bench"
    cache: str = "runs/bench-cache"
    taus: tuple[float, ...] = DEFAULT_TAUS
    hetero_taus: tuple[float, ...] = (0.9,)
    option_taus: tuple[float, ...] = (0.9,)
    hetero_option_taus: tuple[float, ...] = (0.9,)
    options: tuple[str, ...] = ("warm", "uplink", "bf16", "all")
    extra_baselines: tuple[str, ...] = ("fedit+bf16",)  # a baseline with an option: "method+option"
    budget_match_tau: float | None = None
    e_tolerance: float = 0.005
    settings: tuple[str, ...] = ("homogeneous", "heterogeneous")
    variants: tuple[str, ...] = field(default=())  # run only these names (all if empty)
    eval_every_round: bool = False  # score every round (curves), not only the last
    exact_match: bool = False  # also greedy exact match on the test split (the skills task)
    seeds: tuple[int, ...] = ()  # training seeds: one bench each under OUT/seed-N, then fair.md

    def __post_init__(self) -> None:  # before any model is loaded
        unknown = sorted(set(self.settings) - {"homogeneous", "heterogeneous"})
        if unknown or not self.settings:
            raise ConfigError(f"--settings takes homogeneous and heterogeneous, got {list(self.settings)}")
        check_options(self.options)
        for spec in self.extra_baselines:
            parse_baseline(spec)


def setting_config(opts: BenchOptions, setting: str) -> FloristConfig:
    cfg = load_config(opts.config, list(opts.overrides))
    if setting == "heterogeneous":
        n = cfg.federation.num_clients
        ranks = (HETERO * n)[:n] if n != len(HETERO) else HETERO
        cfg = replace(cfg, lora=replace(cfg.lora, ranks=tuple(ranks), alpha=None, alpha_ratio=2.0))
    return cfg


def variant_config(cfg: FloristConfig, v: Variant) -> FloristConfig:
    """``cfg`` with the variant's keys set (validated like any config)."""
    tree = cfg.to_dict()
    for key, value in v.overrides().items():
        set_dotted(tree, key, value)
    return build(tree)


def round_one_key(cfg: FloristConfig, method: str) -> str | None:
    """Which round-1 uploads ``method`` can share: its clients' init ('shared' or 'per_client').

    Round 1 starts every client from the base model with a fresh LoRA: merge-protocol clients draw A
    by ``lora.init``, continue-protocol clients from the shared draw (FedAvg). FFA-LoRA trains B
    only from its own frozen A and shares nothing (None).
    """
    return protocol_of(make_aggregator(method).protocol).round_one_key(cfg.lora.init)


def matched_budget_mb(cfg: FloristConfig, round_one: list[ClientUpdate], tau: float) -> float:
    """Download bytes of FLoRIST at ``tau`` on round 1's shared uploads, in MB (the budget to match)."""
    result = variant_config(cfg, Variant("", "florist", tau=tau)).aggregator().aggregate(round_one)
    return communication(round_one[:1], result).downlink_total / 1e6


class Bench:
    """One comparison: settings x variants, results gathered for the report."""

    def __init__(self, opts: BenchOptions) -> None:
        self.opts, self.out = opts, Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "results.json"
        self.results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.round_one = RoundOneCache(Path(opts.cache))
        self.round_one_results: dict[str, AggregationResult] = {}

    def variants(self, cfg: FloristConfig, setting: str) -> list[Variant]:
        o = self.opts
        homo = setting == "homogeneous"
        out = sweep(taus=o.taus if homo else o.hetero_taus, options=o.options,
                    option_taus=o.option_taus if homo else o.hetero_option_taus)  # fmt: skip
        out += [parse_baseline(b) for b in o.extra_baselines]
        if o.budget_match_tau is not None:
            mb = matched_budget_mb(cfg, self.round_one.get(cfg, setting, cfg.lora.init), o.budget_match_tau)
            out.append(budget(mb, f"tau={o.budget_match_tau:.2f} round-1 bytes"))
        chosen = [v for v in out if not o.variants or v.name in o.variants]
        return sorted(chosen, key=run_order)  # the reference and the goal's candidates first

    def run_setting(self, setting: str) -> None:
        cfg = setting_config(self.opts, setting)
        check_meta(self.out / "results.json", self.results.get("meta"), regime(cfg))  # never mix regimes
        done = self.results.setdefault(setting, {})
        evaluator = split_evaluator(cfg, self.opts.exact_match)
        if report.BASE not in done:
            model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
            done[report.BASE] = [{"round": 0, "eval": evaluator(model.to(cfg.model.torch_device()), tok)}]
            self.save(cfg)
        for v in self.variants(cfg, setting):
            if v.name in done:
                continue
            start = time.perf_counter()
            records = self.run_one(cfg, setting, v, evaluator)
            log.info("%s / %s done in %.0f s", setting, v.name, time.perf_counter() - start)
            records[-1]["options"] = {k: val for k, val in v.overrides().items() if val is not None}
            done[v.name] = records
            self.save(cfg)

    def run_one(
        self, cfg: FloristConfig, setting: str, v: Variant, evaluator: Evaluate
    ) -> list[dict[str, Any]]:
        """All rounds of variant ``v``; round 1 from the shared uploads where its clients allow it;
        every finished round checkpointed under the cache, so a killed run continues from it."""
        last = None if self.opts.eval_every_round else [cfg.federation.rounds]
        if v.method == FULL:  # LoRA ranks do not enter: one run serves both settings
            other = [s.get(v.name) for k, s in self.results.items() if k != setting and isinstance(s, dict)]
            done = [records for records in other if records]
            return (
                json.loads(json.dumps(done[0]))
                if done
                else run_full_variant(cfg, evaluator, eval_rounds=last)
            )
        vcfg = variant_config(cfg, v)
        key = round_one_key(vcfg, v.method)
        shared = self.round_one.get(vcfg, setting, key) if key else None

        def keep(t: int, result: AggregationResult) -> None:
            if t == 1:
                self.round_one_results[f"{setting}/{v.name}"] = result

        folder = Path(self.opts.cache) / setting / "variants" / slug(v.name)
        return run_variant(vcfg, evaluator, shared, keep, eval_rounds=last, checkpoint=folder)

    def save(self, cfg: FloristConfig) -> None:
        self.results["meta"] = regime(cfg)
        write_json_atomic(self.out / "results.json", self.results)  # progress survives a crash

    def run(self) -> dict[str, Any]:
        if self.opts.seeds:
            return self.run_seeds()
        start = time.perf_counter()
        for setting in self.opts.settings:
            self.run_setting(setting)
        summary = self.write_report()
        summary["seconds"] = time.perf_counter() - start
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def run_seeds(self) -> dict[str, Any]:
        """One bench per training seed (``federation.seed``) under ``OUT/seed-N`` with its own cache,
        then the fair report across them (``florist.studies.fair``)."""
        start = time.perf_counter()
        for seed in self.opts.seeds:
            Bench(seed_options(self.opts, seed)).run()
        rounds = setting_config(self.opts, self.opts.settings[0]).federation.rounds
        fair = write_fair_report(self.out, self.opts.settings, rounds)
        goals = {s: fair[s].get("goal") for s in self.opts.settings}
        return {"picks": goals, "out": str(self.out), "seconds": time.perf_counter() - start}

    def write_report(self) -> dict[str, Any]:
        text, picks = report.write_all(self.out, self.results, self.opts.e_tolerance)
        layer = self.layer_section()
        write_text_atomic(self.out / "table.md", text + layer)
        return {"picks": picks, "out": str(self.out)}

    def layer_section(self) -> str:
        florist_r1 = {k: r for k, r in self.round_one_results.items()
                      if "tau=" in k and "+" not in k and k.startswith("homogeneous/")}  # fmt: skip
        if not florist_r1:
            return ""
        report.plot_rank_heatmaps(
            {k.split("/", 1)[1]: r.ranks for k, r in florist_r1.items()}, self.out / "ranks_heatmap.png"
        )
        exact = next(iter(florist_r1.values()))
        if exact.spectra:
            names = report.layer_sorted(exact.spectra)
            chosen = [
                names[0],
                names[1],
                names[len(names) // 2],
                names[len(names) // 2 + 1],
                names[-2],
                names[-1],
            ]
            report.plot_spectra({n: exact.spectra[n].tolist() for n in chosen}, self.out / "spectrum.png",
                                "round 1, homogeneous ranks: first, middle and last layer")  # fmt: skip
        return layerwise_text(florist_r1)


def seed_options(opts: BenchOptions, seed: int) -> BenchOptions:
    """``opts`` for training seed ``seed``: its own output and cache folders, ``federation.seed`` set."""
    out, cache = Path(opts.out) / f"seed-{seed}", Path(opts.cache) / f"seed-{seed}"
    overrides = (*opts.overrides, f"federation.seed={seed}")
    return replace(opts, seeds=(), out=str(out), cache=str(cache), overrides=overrides)


def slug(name: str) -> str:
    """A file name for a variant name: "FLoRIST tau=0.90 +all" -> "florist-tau-0.90-all"."""
    out = "".join(ch.lower() if ch.isalnum() or ch == "." else "-" for ch in name)
    return "-".join(p for p in out.split("-") if p)


class SplitEvaluator:
    """The test split's scores, with the validation split's under ``"validation"`` when the config
    withholds one (``data.validation_per_label``): choices are made on validation, tables on test."""

    def __init__(self, test: Evaluator, validation: Evaluator | None) -> None:
        self.test, self.validation = test, validation

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        out = self.test(model, tokenizer)
        if self.validation is not None:
            out["validation"] = self.validation(model, tokenizer)
        return out


def split_evaluator(cfg: FloristConfig, exact_match: bool = False) -> SplitEvaluator:
    """Held-out loss with per-row losses on the test split (with ``exact_match``: greedy exact match
    there too, per category), and on the validation split if any."""
    ev = replace(cfg.eval, mmlu=None, exact_match=False)
    test = Evaluator(replace(ev, exact_match=exact_match), test_examples(cfg.data), cfg.data.seed,
                     cfg.run.progress, rows=True)  # fmt: skip
    val_rows = validation_examples(cfg.data, cfg.federation.num_clients)
    val = Evaluator(ev, val_rows, cfg.data.seed, cfg.run.progress, rows=True) if val_rows else None
    return SplitEvaluator(test, val)


def run_order(v: Variant) -> int:
    """FLoRA (the reference), FedIT, plain FLoRIST, FLoRIST with every option, single options, the rest."""
    if v.name == "FLoRA":
        return 0
    if v.name == "FedIT":
        return 1
    if v.method == "florist":
        return 2 if not v.options else 3 if "+all" in v.name else 4
    return 5


def regime(cfg: FloristConfig) -> dict[str, Any]:
    """What every variant of the bench shares, recorded beside the results."""
    t = cfg.train
    budget_ = {"steps": t.steps, "epochs": t.epochs, "examples": t.examples}
    return {
        "model": cfg.model.name, "data": cfg.data.source, "clients": cfg.federation.num_clients,
        "rounds": cfg.federation.rounds, "lora_init": cfg.lora.init, "lr": t.lr,
        "effective_batch": t.effective_batch, "budget_per_round": {k: v for k, v in budget_.items() if v},
        "max_length": t.max_length, "train_on_inputs": t.train_on_inputs, "train_precision": t.precision,
        "eval_precision": cfg.eval.precision, "seed": cfg.federation.seed,
    }  # fmt: skip


def layerwise_text(results: dict[str, AggregationResult]) -> str:
    lines = [
        "\n### Rank kept per layer (round 1, homogeneous ranks)\n",
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``florist bench``."""
    study_arguments(p, "runs/bench", "results.json, table.md, plots")
    p.add_argument("--cache", default="runs/bench-cache", help="round-1 uploads, reused by a rerun")
    p.add_argument("--taus", type=floats, default=None, help="FLoRIST taus, homogeneous ranks")
    p.add_argument("--hetero-taus", type=floats, default=None, help="FLoRIST taus, heterogeneous ranks")
    p.add_argument("--option-taus", type=floats, default=None, help="taus at which the options run")
    p.add_argument("--options", default="warm,uplink,bf16,all", help="FLoRIST options to run (or none)")
    p.add_argument("--extra-baselines", default="fedit+bf16", help="baselines with an option (or none)")
    p.add_argument("--budget-match-tau", type=float, default=None, help="add a byte-budget variant")
    p.add_argument("--settings", default="homogeneous,heterogeneous", help="rank settings to run")
    p.add_argument("--variants", default="", help="run only these variant names (comma-separated)")
    p.add_argument("--report-only", action="store_true", help="redraw table.md and plots from results.json")
    p.add_argument("--seeds", type=ints, default=(), help="training seeds: one bench each, then fair.md")
    p.add_argument("--eval-every-round", action="store_true", help="score every round (loss-bytes curves)")
    p.add_argument("--exact-match", action="store_true", help="also greedy exact match on the test split")


def main(args: argparse.Namespace) -> None:
    """``florist bench``: run (or, with ``--report-only``, redraw) and print the table."""
    if args.report_only and args.seeds:
        cfg_opts = BenchOptions(config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides))
        rounds = setting_config(cfg_opts, "homogeneous").federation.rounds
        write_fair_report(Path(args.out), names(args.settings), rounds)
        print((Path(args.out) / "fair.md").read_text())
        return
    if args.report_only:
        report.rewrite_tables(Path(args.out))
        print((Path(args.out) / "table.md").read_text())
        return
    given = {
        "taus": args.taus, "hetero_taus": args.hetero_taus, "option_taus": args.option_taus,
        "hetero_option_taus": args.option_taus,
    }  # fmt: skip
    opts = BenchOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out, cache=args.cache,
        settings=names(args.settings), options=names(args.options),
        extra_baselines=names(args.extra_baselines), budget_match_tau=args.budget_match_tau,
        variants=names(args.variants), seeds=args.seeds, eval_every_round=args.eval_every_round,
        exact_match=args.exact_match,
        **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    summary = Bench(opts).run()
    print((Path(args.out) / ("fair.md" if args.seeds else "table.md")).read_text())
    print(f"picks: {summary['picks']}; {summary['seconds']:.0f} s; outputs in {args.out}")
