"""argparse helpers shared by the ``florist`` subcommands."""

from __future__ import annotations

import argparse
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
