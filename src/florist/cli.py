"""The ``florist`` command line.

florist aggregate --method florist --tau 0.9 [--budget-mb X] [--weights n1,n2,...] DIR... -o OUT
florist inspect DIR [--json]
florist export RUN_OR_ADAPTER (--merge [--base MODEL] | --max-rank R [--tau T]) -o OUT
florist report RUN                                 the run's curves as PNGs in RUN/report/
florist run CONFIG.toml [section.key=value ...]   federated fine-tuning on Flower's simulation runtime
florist demo [section.key=value ...]              the embedded demo: SmolLM2 + skills set, FLoRIST
florist compare                                   every aggregator on 8 synthetic SmolLM2-shaped adapters
florist bench [--out DIR] [section.key=value ...]  the paper's comparison: every method, a table and plots
florist regime [--out DIR] [--batches 4,32] [--examples 32,128,512]  round 1: kept rank vs the training regime
florist client-sweep [--out DIR] [--counts 4,8,16,32]  kept rank and bytes against the number of clients
florist privacy-study [--out DIR] [--epsilons 1,3,8,inf]  loss and a membership attack against epsilon
florist deploy CONFIG.toml --nodes N [section.key=value ...]  the same on a local TLS Flower deployment
florist config [--json | --starter FILE | --app-dir]  every config key with help; a starter; the Flower App
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from florist import deploy
from florist.cli_parsing import IntermixedParser
from florist.console import setup_logging
from florist.errors import ConfigError, FloristError, QuorumLost


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_aggregate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from florist.aggregation import available

    p = sub.add_parser("aggregate", help="aggregate PEFT LoRA adapter directories into one global adapter")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="PEFT adapter directories, one per client")
    p.add_argument("-o", "--out", required=True, help="output directory (PEFT adapter + report)")
    p.add_argument("--method", default="florist", choices=available())
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--tau", type=_finite, help="florist: energy threshold in (0, 1] (default 0.9)")
    rank.add_argument("--rank", type=int, help="florist: fixed rank for every module")
    rank.add_argument(
        "--budget-mb", type=_finite, help="florist: download budget per client, in MB (1e6 bytes)"
    )
    p.add_argument("--min-rank", type=int, default=1)
    p.add_argument("--max-rank", type=int)
    p.add_argument(
        "--weights", type=_floats, help="n_k per client, in the order of DIR (default: florist.json)"
    )
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.add_argument(
        "--basis", default="qr", choices=["qr", "svd"], help="florist: how the stacks are factored"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def _add_config(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("config", help="every configuration key with its type, default and help")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the keys as JSON")
    out.add_argument("--starter", metavar="FILE", help="write a commented starter config to FILE (new file)")
    out.add_argument(
        "--app-dir", action="store_true", help="print the folder of florist's Flower App (for flwr run)"
    )


def _add_inspect(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("inspect", help="ranks, shapes and singular values of a PEFT LoRA adapter")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export", help="a run's adapter merged into its base model, or re-compressed under a rank cap"
    )
    p.add_argument(
        "source", metavar="RUN_OR_ADAPTER", help="a run directory (its adapter/) or a PEFT adapter dir"
    )
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--merge", action="store_true", help="save base + adapter as one transformers model")
    p.add_argument("--base", help="--merge: the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--max-rank", type=int, help="re-compress every module to at most this rank")
    p.add_argument(
        "--tau", type=_finite, help="re-compress to the smallest rank holding this energy fraction"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _add_report(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report", help="a run's curves (loss vs round and vs bytes, ranks) as PNGs in RUN/report/"
    )
    p.add_argument("run", metavar="RUN", help="a run directory (with metrics.jsonl)")


def _add_compare(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "compare", help="aggregate 8 client adapters on SmolLM2-135M shapes and verify with peft"
    )
    p.add_argument("--out", default="runs/compare", help="where the comparison writes its adapters")


def _add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a federation (Flower simulation runtime) from a TOML config")
    p.add_argument("config", help="TOML config file, or a packaged one by name (demo, dolly, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. federation.rounds=5")
    p.add_argument(
        "--resume", action="store_true", help="continue run.dir/run.name from its latest checkpoint"
    )
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    p.__class__ = IntermixedParser  # overrides may follow the flags: CONFIG --resume federation.rounds=5
    d = sub.add_parser(
        "demo", help="federated FLoRIST on SmolLM2 and the embedded skills set (~10 min on CPU)"
    )
    d.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_bench(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench", help="every method on the paper's Dolly federation: total bytes vs paired loss"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the bench config")
    p.add_argument("--config", default=None, help="base config (default: the packaged paper_cpu.toml)")
    p.add_argument("--out", default="runs/bench", help="output directory (results.json, table.md, plots)")
    p.add_argument("--cache", default="runs/bench-cache", help="round-1 uploads, reused by a rerun")
    p.add_argument("--taus", type=_floats, default=None, help="FLoRIST taus, homogeneous ranks")
    p.add_argument("--hetero-taus", type=_floats, default=None, help="FLoRIST taus, heterogeneous ranks")
    p.add_argument("--option-taus", type=_floats, default=None, help="taus at which the options run")
    p.add_argument("--options", default="warm,uplink,bf16,all", help="FLoRIST options to run (or none)")
    p.add_argument("--extra-baselines", default="fedit+bf16", help="baselines with an option (or none)")
    p.add_argument("--budget-match-tau", type=float, default=None, help="add a byte-budget variant")
    p.add_argument("--settings", default="homogeneous,heterogeneous", help="rank settings to run")
    p.add_argument("--variants", default="", help="run only these variant names (comma-separated)")
    p.add_argument("--report-only", action="store_true", help="redraw table.md and plots from results.json")
    p.add_argument("--seeds", type=_ints, default=(), help="training seeds: one bench each, then fair.md")
    p.add_argument("--eval-every-round", action="store_true", help="score every round (loss-bytes curves)")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _add_regime(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("regime", help="round-1 study: FLoRIST's kept rank and bytes vs batch, budget, init")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the bench config")
    p.add_argument("--config", default=None, help="base config (default: the packaged paper_cpu.toml)")
    p.add_argument("--out", default="runs/regime", help="output directory (results.json, table.md, plot)")
    p.add_argument("--uploads", default="runs/regime-uploads", help="where the clients' uploads are kept")
    p.add_argument("--batches", type=_ints, default=(4, 32), help="effective batch sizes")
    p.add_argument("--examples", type=_ints, default=(32, 128, 512), help="examples per client per round")
    p.add_argument("--inits", default="per_client,shared", help="lora.init policies")
    p.add_argument("--taus", type=_floats, default=None, help="FLoRIST taus (default 0.99,0.95,0.9,0.87,0.8)")
    p.add_argument(
        "--report-only", action="store_true", help="redraw table.md and the plot from results.json"
    )


def _add_client_sweep(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "client-sweep", help="FLoRIST's kept rank and bytes, and FLoRA's, against the client count"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the bench config")
    p.add_argument("--config", default=None, help="base config (default: the packaged paper_cpu.toml)")
    p.add_argument(
        "--out", default="runs/client-sweep", help="output directory (results.json, table.md, plot)"
    )
    p.add_argument(
        "--uploads", default="runs/client-sweep-uploads", help="where the clients' uploads are kept"
    )
    p.add_argument("--counts", type=_ints, default=(4, 8, 16, 32), help="numbers of clients K")
    p.add_argument("--inits", default="shared,per_client", help="lora.init policies")
    p.add_argument("--total-examples", type=int, default=512, help="examples per round, all clients together")
    p.add_argument("--taus", type=_floats, default=(0.95, 0.9, 0.8), help="FLoRIST taus")
    p.add_argument(
        "--report-only", action="store_true", help="redraw table.md and the plot from results.json"
    )


def _epsilons(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated epsilons (or inf), got {text!r}") from err
    if not values or not all(v > 0 and not math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be > 0 (inf: no DP), got {text!r}")
    return values


def _add_privacy_study(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "privacy-study", help="held-out loss and a membership attack against epsilon, per method"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the study config")
    p.add_argument("--config", default=None, help="base config (default: the packaged paper_cpu.toml)")
    p.add_argument(
        "--out", default="docs/results/privacy", help="output directory (results.json, table.md, plot)"
    )
    p.add_argument("--cache", default="runs/privacy-cache", help="per-round checkpoints of unfinished cells")
    p.add_argument(
        "--epsilons", type=_epsilons, default=(1.0, 3.0, 8.0, math.inf), help="targets; inf: no DP"
    )
    p.add_argument("--modes", default="dp-sgd,client", help="privacy modes: dp-sgd, client")
    p.add_argument("--rounds", type=int, default=3, help="rounds per cell")
    p.add_argument("--clients", type=int, default=100, help="client mode: clients re-split from the pool")
    p.add_argument("--fraction", type=float, default=0.1, help="client mode: clients sampled per round")
    p.add_argument(
        "--report-only", action="store_true", help="redraw table.md and the plot from results.json"
    )


def _privacy_study(args: argparse.Namespace) -> None:
    from pathlib import Path

    from florist.config import PAPER_CONFIG
    from florist.studies.privacy import StudyOptions, run, write_report

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or set(modes) - {"dp-sgd", "client"}:
        raise ConfigError(f"--modes takes dp-sgd and client, got {args.modes!r}")
    if args.rounds < 1 or args.clients < 2 or not 0 < args.fraction <= 1:
        raise ConfigError("--rounds must be >= 1, --clients >= 2 and --fraction in (0, 1]")
    opts = StudyOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out, cache=args.cache,
        epsilons=args.epsilons, modes=modes, rounds=args.rounds, clients=args.clients, fraction=args.fraction,
    )  # fmt: skip
    if args.report_only:
        path = Path(opts.out) / "results.json"
        write_report(Path(opts.out), json.loads(path.read_text()) if path.is_file() else {})
    else:
        run(opts)
    print((Path(opts.out) / "table.md").read_text())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("florist")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="florist",
        description="Federated LoRA fine-tuning with FLoRIST aggregation.\n\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"florist {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_aggregate(sub)
    _add_config(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_report(sub)
    _add_run(sub)
    _add_compare(sub)
    _add_bench(sub)
    _add_regime(sub)
    _add_client_sweep(sub)
    _add_privacy_study(sub)
    deploy.add_parser(sub)
    return parser


def _aggregate(args: argparse.Namespace) -> None:
    from florist.commands.aggregate import AggregateJob, run_aggregate
    from florist.config.schema import AggregationConfig
    from florist.tables import print_aggregation

    aggregation = AggregationConfig(
        method=args.method, tau=args.tau, rank=args.rank, budget_mb=args.budget_mb,
        min_rank=args.min_rank, max_rank=args.max_rank, dtype=args.dtype, basis=args.basis,
    )  # fmt: skip
    opts = AggregateJob(aggregation, args.weights, args.wire_dtype, args.overwrite)
    report = run_aggregate(args.dirs, args.out, opts)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_aggregation(report, args.out)


def _config(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.table import Table

    from florist.commands.keys import config_keys, starter_toml
    from florist.tables import make_console

    if args.app_dir:
        from florist.deploy.runconfig import DEFAULT_APP

        print(DEFAULT_APP)
        return
    if args.starter:
        path = Path(args.starter)
        if path.exists():
            raise ConfigError(f"{args.starter} exists; give a new file name")
        path.write_text(starter_toml(), encoding="utf-8")
        print(f"wrote {args.starter}: run it with  florist run {args.starter}")
        return
    rows = config_keys()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="florist configuration keys (section.key=value on any command line)")
    for column in ("key", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["key"], r["type"], json.dumps(r["default"]), r["help"])
    make_console().print(table)


def _inspect(args: argparse.Namespace) -> None:
    from florist.commands.inspect import inspect_adapter
    from florist.tables import human_bytes, inspect_table, make_console

    info = inspect_adapter(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    console = make_console()
    console.print(inspect_table(info["modules"], f"{args.dir} (base model {info['base_model']})"))
    console.print(f"{len(info['modules'])} modules, {human_bytes(info['file_bytes'])} on disk")


def _export(args: argparse.Namespace) -> None:
    from florist.commands.export import export_capped, export_merged, print_report

    if args.merge and (args.max_rank is not None or args.tau is not None):
        raise ConfigError(
            "--merge writes the adapter as it is; re-compress with --max-rank/--tau in a separate export"
        )
    if args.merge:
        summary = export_merged(args.source, args.out, args.base, args.overwrite)
        print(f"merged {summary['modules']} modules into {summary['base_model']}: {args.out}")
        return
    print_report(export_capped(args.source, args.out, args.max_rank, args.tau, args.overwrite))


def _report(args: argparse.Namespace) -> None:
    from florist.commands.report import write_report

    for path in write_report(args.run):
        print(path)


def _compare(args: argparse.Namespace) -> None:
    from florist.commands.compare import run_compare

    run_compare(args.out)


def _run(args: argparse.Namespace) -> None:
    from florist.commands.run import run

    run(args.config, args.overrides, resume=args.resume, force=args.force)


def _demo(args: argparse.Namespace) -> None:
    from florist.commands.run import demo

    demo(args.overrides)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from florist.config import PAPER_CONFIG
    from florist.studies import report
    from florist.studies.fair import write_fair_report
    from florist.studies.headline import Bench, BenchOptions

    if args.report_only and args.seeds:
        from florist.studies.headline import setting_config

        cfg_opts = BenchOptions(config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides))
        rounds = setting_config(cfg_opts, "homogeneous").federation.rounds
        write_fair_report(Path(args.out), _names(args.settings), rounds)
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
        settings=_names(args.settings), options=_names(args.options),
        extra_baselines=_names(args.extra_baselines), budget_match_tau=args.budget_match_tau,
        variants=_names(args.variants), seeds=args.seeds, eval_every_round=args.eval_every_round,
        **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    summary = Bench(opts).run()
    print((Path(args.out) / ("fair.md" if args.seeds else "table.md")).read_text())
    print(f"picks: {summary['picks']}; {summary['seconds']:.0f} s; outputs in {args.out}")


def _regime(args: argparse.Namespace) -> None:
    from florist.config import PAPER_CONFIG
    from florist.studies.regime import TAUS, RegimeOptions, run, write_report

    opts = RegimeOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out,
        uploads=args.uploads, batches=args.batches, examples=args.examples,
        inits=tuple(i.strip() for i in args.inits.split(",") if i.strip()), taus=args.taus or TAUS,
    )  # fmt: skip
    if not args.report_only:
        run(opts)
    print(write_report(opts))


def _client_sweep(args: argparse.Namespace) -> None:
    from florist.config import PAPER_CONFIG
    from florist.studies.client_sweep import SweepOptions, run, write_report

    if args.total_examples < 1:
        raise ConfigError(f"--total-examples must be >= 1, got {args.total_examples}")
    if not args.counts or min(args.counts) < 1:
        raise ConfigError(f"--counts must be client counts >= 1, got {list(args.counts)}")
    opts = SweepOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out,
        uploads=args.uploads, counts=args.counts, total_examples=args.total_examples, taus=args.taus,
        inits=tuple(i.strip() for i in args.inits.split(",") if i.strip()),
    )  # fmt: skip
    if not args.report_only:
        run(opts)
    print(write_report(opts))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    commands = {
        "aggregate": _aggregate,
        "inspect": _inspect,
        "config": _config,
        "export": _export,
        "report": _report,
        "compare": _compare,
        "regime": _regime,
        "client-sweep": _client_sweep,
        "privacy-study": _privacy_study,
        "run": _run,
        "demo": _demo,
        "bench": _bench,
        "deploy": deploy.cli,
    }
    try:
        commands[args.command](args)
    except BrokenPipeError:  # `florist inspect --json | head`: the reader has gone, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except QuorumLost as err:
        print(f"florist {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    except (FloristError, ConfigError) as err:
        print(f"florist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable output, a full disk, a missing file: the message names the path
        print(f"florist {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
