"""Flower's simulation runtime behind ``florist run``: a private SuperLink in simulation mode on
127.0.0.1 and ``flwr run`` of florist's Flower App through it, as Flower supports (its Python
``run_simulation`` is deprecated). Each client node's ClientApp runs in a Ray actor that keeps its
model loaded across rounds; the ServerApp in a process of the SuperLink's, resolving the config's
relative paths against this process's working directory. The console shows florist's lines and
every warning, not Flower's INFO chatter; the summary comes back from the ServerApp.

    summary = run_simulation(cfg)              # one run: starts and stops its own SuperLink
    with Simulation(workdir) as sim:           # several runs through one SuperLink (tests)
        sim.start()
        a, b = sim.run(cfg_a), sim.run(cfg_b)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import tomli_w

from florist.config import FloristConfig
from florist.deploy.link import LocalLink, healthy, not_flower_chatter
from florist.deploy.prelaunch import stopped_on_sigterm
from florist.deploy.runconfig import DEFAULT_APP
from florist.errors import ConfigError
from florist.fsutil import write_text_atomic

log = logging.getLogger(__name__)
CONNECTION = "florist-simulation"


def backend_config(cfg: FloristConfig, cores: int | None = None, gpus: int | None = None) -> dict[str, Any]:
    """Ray resources: each client gets ``cpus_per_client`` cores (at most all of them) and its GPU
    share (``gpus_per_client``; "auto": the visible GPUs split between the clients that run at once,
    as many as the cores allow, at most one GPU each). ``cores`` / ``gpus``: this machine's, by default."""
    import torch

    cores = cores if cores is not None else os.cpu_count() or 1
    gpus = gpus if gpus is not None else torch.cuda.device_count()
    fed = cfg.federation
    cpus = min(cores, int(fed.cpus_per_client))
    share = fed.gpus_per_client
    if share == "auto":
        at_once = max(1, min(fed.num_clients, cores // cpus))
        share = min(1.0, gpus / at_once) if gpus else 0.0
    assert isinstance(share, float)
    if gpus and share == 0.0:
        log.warning(
            "federation.gpus_per_client = 0: the clients train on the CPU although %d GPU(s) are visible "
            "(the server uses CUDA); set it to 'auto' or a fraction to use them",
            gpus,
        )
    resources: dict[str, Any] = {"num_cpus": cpus, "num_gpus": share}
    init: dict[str, Any] = {"num_cpus": cores, "log_to_driver": True}
    if gpus:
        init["num_gpus"] = gpus
    return {"client_resources": resources, "init_args": init}


def federation_config(cfg: FloristConfig, cores: int | None = None, gpus: int | None = None) -> str:
    """``flwr run --federation-config``: the number of simulated SuperNodes and ``backend_config``."""
    backend = backend_config(cfg, cores, gpus)
    items: dict[str, Any] = {"num-supernodes": cfg.federation.num_clients}
    for section, values in (
        ("client-resources", backend["client_resources"]),
        ("init-args", backend["init_args"]),
    ):
        items.update({f"{section}-{k.replace('_', '-')}": v for k, v in values.items()})
    return " ".join(f"{k}={tomli_w.dumps({'v': v})[4:].strip()}" for k, v in items.items())


class Simulation(LocalLink):
    """A SuperLink in simulation mode on a free port of 127.0.0.1, files under ``workdir``; ``run``
    as often as needed, one run at a time (see the module). A context manager: its processes stop on exit.

    Parameters
    ----------
    workdir : Path
        ``flwr-home``, ``logs``, ``pids.json``, run configs, the outcome file.
    app : Path
        The Flower App (florist's, by default).
    echo : IO[str] | None
        Where florist's lines and every warning of the run go while it runs (None: its log only).
    startup_timeout : float
        Seconds to wait for the SuperLink to answer.
    """

    def __init__(
        self,
        workdir: Path,
        app: Path = DEFAULT_APP,
        echo: IO[str] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        super().__init__(workdir, app, CONNECTION, echo, cwd=Path.cwd())
        self.startup_timeout = startup_timeout

    def start(self) -> None:
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        connection = {"address": self.address, "insecure": True}
        write_text_atomic(
            self.home / "config.toml",
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}),
        )
        url = f"http://{self.address}/health"
        self.start_superlink(["--simulation", "--insecure"], lambda: healthy(url), self.startup_timeout)

    def run(self, cfg: FloristConfig) -> dict[str, Any] | None:
        """Run ``cfg`` to its end through this SuperLink; its summary (RUN/summary.json holds it too;
        None: an app other than florist's ran and handed back none)."""
        return self.run_flwr(cfg, ["--federation-config", federation_config(cfg)], keep=not_flower_chatter)


def run_simulation(cfg: FloristConfig) -> dict[str, Any]:
    """Run ``cfg`` to the end on a SuperLink of its own; returns the summary that RUN/summary.json holds."""
    if cfg.run.resume:  # refuse a changed config or a missing checkpoint before any process starts
        from florist.server.checkpoint import load_latest

        if not cfg.run.name:
            raise ConfigError(
                "run.resume needs run.name, the run directory to continue (or: florist run RUN/config.toml "
                "--resume, whose saved config names its directory)"
            )
        load_latest(Path(cfg.run.dir) / str(cfg.run.name) / "checkpoints", cfg, cfg.run.force)
    workdir = Path(tempfile.mkdtemp(prefix="florist-simulation-"))  # kept when the run fails: its logs
    with stopped_on_sigterm(), Simulation(workdir, echo=sys.stderr) as sim:  # killed: still stopped
        sim.start()
        summary = sim.run(cfg)
    assert summary is not None  # florist's app hands one back, or run_flwr raised
    shutil.rmtree(workdir, ignore_errors=True)
    return summary
