"""What a florist command prints: our own lines at INFO, other libraries' only from WARNING up.

    setup_logging(verbose=False)   # florist.* at INFO; Flower, Ray, alembic, transformers at WARNING
    setup_logging(verbose=True)    # everything at DEBUG, as the libraries themselves would print it

Flower prints its records through its own handler; ours does not repeat them. One Flower warning is
dropped on purpose: ``florist run`` calls ``flwr.simulation.run_simulation``, which Flower marks
deprecated in favour of the ``flwr run`` CLI. florist keeps it because the ServerApp must run in this
process to hand its summary back; ``flwr run`` and ``florist deploy`` remain the supported
multi-process paths (docs/flower.md).
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(levelname)s %(message)s"


class _OursOrWarnings(logging.Filter):
    """Keep florist's records, and anyone's from WARNING up; Flower's own handler shows Flower's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "flwr" or record.name.startswith("flwr."):
            return False
        ours = record.name == "florist" or record.name.startswith("florist.")
        return ours or record.levelno >= logging.WARNING


class _QuietFlower(logging.Filter):
    """Flower's own handler: WARNING and up, less the deprecation notice explained above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return not ("DEPRECATED FEATURE" in str(record.msg) and "run_simulation" in str(record.args))


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once for a CLI command (see the module docstring)."""
    root = logging.getLogger()
    if root.handlers:  # a host program (or pytest) configured logging already: leave its handlers be
        return
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    if verbose:
        return
    for handler in root.handlers:
        handler.addFilter(_OursOrWarnings())
    if not any(isinstance(f, _QuietFlower) for f in logging.getLogger("flwr").filters):
        logging.getLogger("flwr").addFilter(_QuietFlower())
    # Ray's own tip asks for this to silence its FutureWarning; CPU-only clients lose nothing by it.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
