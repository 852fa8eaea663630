"""``florist demo [section.key=value ...]``: ``florist run`` on the packaged demo config (SmolLM2 +
the embedded skills set, FLoRIST), with the same checks before it starts."""

from __future__ import annotations

import argparse

from florist.commands.run import run
from florist.config import DEMO_CONFIG


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def main(args: argparse.Namespace) -> None:
    run(DEMO_CONFIG, args.overrides, demo=True)
