"""argparse helpers shared by the ``florist`` subcommands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence


class IntermixedParser(argparse.ArgumentParser):
    """Lets ``section.key=value`` overrides follow options: ``CONFIG --nodes 3 federation.rounds=2``."""

    _inner = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inner:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def floats(text: str) -> tuple[float, ...]:
    """``--taus 0.9,0.8``: comma-separated finite numbers."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def finite(text: str) -> float:
    """One finite number."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def ints(text: str) -> tuple[int, ...]:
    """``--counts 4,8``: comma-separated integers."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def names(text: str) -> tuple[str, ...]:
    """``--settings homogeneous,heterogeneous``: comma-separated names; ``none`` for none."""
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")


def study_arguments(p: argparse.ArgumentParser, out: str, what: str) -> None:
    """What every study command takes: config overrides, a base config, its output directory."""
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the study's config")
    p.add_argument("--config", default=None, help="base config (default: the packaged paper_cpu.toml)")
    p.add_argument("--out", default=out, help=f"output directory ({what})")
