"""``florist demo [section.key=value ...]``: ``florist run`` on the packaged demo config (SmolLM2 +
the embedded skills set, FLoRIST)."""

from __future__ import annotations

import argparse

from florist.config import DEMO_CONFIG, load_config
from florist.flower.simulation import run_simulation
from florist.tables import print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def main(args: argparse.Namespace) -> None:
    print_summary(run_simulation(load_config(DEMO_CONFIG, args.overrides)), demo=True)
