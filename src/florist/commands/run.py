"""``florist run CONFIG.toml [section.key=value ...]``: a federation on Flower's simulation runtime."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from florist.cli_parsing import IntermixedParser
from florist.config import load_config
from florist.deploy.prelaunch import check_before_start
from florist.flower.simulation import run_simulation
from florist.tables import print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.__class__ = IntermixedParser  # overrides may follow the flags: CONFIG --resume federation.rounds=5
    p.add_argument("config", help="TOML config file, or a packaged one by name (demo, dolly, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. federation.rounds=5")
    p.add_argument(
        "--resume", action="store_true", help="continue run.dir/run.name from its latest checkpoint"
    )
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed config")


def main(args: argparse.Namespace) -> None:
    run(args.config, args.overrides, resume=args.resume, force=args.force)


def run(
    config: str, overrides: Sequence[str], resume: bool = False, force: bool = False, demo: bool = False
) -> None:
    """Load, check before any process starts (``check_before_start``), run, print the summary (with
    ``demo``: the demo's closing lines); ``florist demo`` is this on the packaged demo config."""
    flags = ["run.resume=true"] * resume + ["run.force=true"] * force
    if not sys.stderr.isatty() and not any(o.startswith("run.progress=") for o in overrides):
        flags.append("run.progress=false")  # into a log file, every bar redraw would be a \r line
    cfg = load_config(config, [*overrides, *flags])
    check_before_start(cfg)
    print_summary(run_simulation(cfg), demo=demo)
