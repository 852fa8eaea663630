"""What a florist command prints: our own lines at INFO, other libraries' only from WARNING up.

    setup_logging(verbose=False)   # florist.* at INFO; Flower, Ray, alembic, transformers at WARNING
    setup_logging(verbose=True)    # everything at DEBUG, as the libraries themselves would print it

Flower prints its records through its own handler; ours does not repeat them. ``quiet_imports``
drops two notices every client process would print once, that say nothing about the run: bitsandbytes'
"Failed to load CPU gemm_4bit_forward from kernels-community" (an optional accelerator package) and
torch's deprecation of ``torch.jit.script_method``, which a library uses at import. The ServerApp and
the ClientApp call these in Flower's processes, so ``florist run``, ``flwr run`` and a deployment
print the same (``florist.deploy.link`` drops Flower's INFO chatter from the stream).
"""

from __future__ import annotations

import logging
import os
import warnings

FORMAT = "%(levelname)s %(message)s"


class _OursOrWarnings(logging.Filter):
    """Keep florist's records, and anyone's from WARNING up; Flower's own handler shows Flower's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "flwr" or record.name.startswith("flwr."):
            return False
        ours = record.name == "florist" or record.name.startswith("florist.")
        return ours or record.levelno >= logging.WARNING


class _QuietFlower(logging.Filter):
    """Flower's own handler: WARNING and up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_imports() -> None:
    """Drop the two import-time notices named in the module docstring (idempotent)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
    )
    # Ray's own tip asks for this to silence its FutureWarning; CPU-only clients lose nothing by it.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once for a CLI command (see the module docstring)."""
    root = logging.getLogger()
    if root.handlers:  # a host program (or pytest) configured logging already: leave its handlers be
        return
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT)
    if verbose:
        return
    quiet_imports()
    for handler in root.handlers:
        handler.addFilter(_OursOrWarnings())
    if not any(isinstance(f, _QuietFlower) for f in logging.getLogger("flwr").filters):
        logging.getLogger("flwr").addFilter(_QuietFlower())
