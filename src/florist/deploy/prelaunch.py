"""What ``florist run`` and ``florist deploy`` do before the first process starts.

check_before_start(cfg)   everything the config alone can tell, each as one ConfigError line: the
                          run directory, the device, the data files, the model's target modules
stopped_on_sigterm()      while it is active, SIGTERM (a job scheduler, ``timeout``, ``kill``)
                          ends the command as Ctrl-C would, so the SuperLink, the SuperNodes and
                          their children are stopped on the way out instead of left running
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from florist.client.model import check_targets, published_name
from florist.config import FloristConfig
from florist.data.federated import check_data
from florist.errors import ConfigError


def check_before_start(cfg: FloristConfig) -> None:
    """Refuse, in one line, what would otherwise fail in a node or the server after processes start."""
    from florist.server.rundir import RunDir

    if not cfg.run.resume:  # a resume's checkpoint is checked where it is read (flower.simulation)
        RunDir(cfg, published_name(cfg.model.name))  # the run directory exists and is not empty
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device = 'cuda', but torch sees no CUDA device on this machine")
    check_data(cfg.data, cfg.federation.num_clients)  # a bad data file: file, line and field
    check_targets(cfg.model.name, cfg.lora.target_modules)  # modules the model lacks or cannot adapt


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def stopped_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
