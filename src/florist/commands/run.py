"""``florist run CONFIG.toml [section.key=value ...]``: a federation on Flower's simulation runtime."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from florist.cli_parsing import IntermixedParser
from florist.client.model import check_targets
from florist.config import load_config
from florist.data.federated import check_data
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


def run(config: str, overrides: Sequence[str], resume: bool = False, force: bool = False) -> None:
    flags = ["run.resume=true"] * resume + ["run.force=true"] * force
    cfg = load_config(config, [*overrides, *flags])
    check_data(cfg.data, cfg.federation.num_clients)  # a bad data file: one line, before any node starts
    check_targets(cfg.model.name, cfg.lora.target_modules)  # modules the model lacks or cannot adapt
    print_summary(run_simulation(cfg))
