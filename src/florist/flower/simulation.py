"""Flower's simulation runtime, in this process: the ServerApp here, each client node's ClientApp in a
Ray actor that keeps its model loaded across rounds. The same apps run under ``flwr run`` and on a
deployment (docs/flower.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from florist.config import FloristConfig
from florist.errors import ConfigError

log = logging.getLogger(__name__)


def backend_config(cfg: FloristConfig, cores: int | None = None, gpus: int | None = None) -> dict[str, Any]:
    """Ray resources: each client gets ``cpus_per_client`` cores (at most all of them) and its GPU
    share (``gpus_per_client``; "auto": the visible GPUs split between the clients that run at once,
    as many as the cores allow, at most one GPU each). ``cores`` / ``gpus``: this machine's, by default."""
    import torch

    cores = cores if cores is not None else os.cpu_count() or 1
    gpus = gpus if gpus is not None else torch.cuda.device_count()
    fed = cfg.federation
    cpus = min(float(cores), fed.cpus_per_client)
    share = fed.gpus_per_client
    if share == "auto":
        at_once = max(1, min(fed.num_clients, int(cores // cpus)))
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


def run_simulation(cfg: FloristConfig) -> dict[str, Any]:
    """Run ``cfg`` to the end; returns the summary that RUN/summary.json also holds."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from florist.flower.client_app import make_client_app
    from florist.flower.server_app import make_server_app

    if cfg.run.resume:  # refuse a changed config or a missing checkpoint before Ray starts
        from florist.server.checkpoint import load_latest

        if not cfg.run.name:
            raise ConfigError(
                "run.resume needs run.name, the run directory to continue (or: florist run RUN/config.toml "
                "--resume, whose saved config names its directory)"
            )
        load_latest(Path(cfg.run.dir) / str(cfg.run.name) / "checkpoints", cfg, cfg.run.force)
    summary: dict[str, Any] = {}
    errors: list[BaseException] = []
    flwr_run_simulation(
        server_app=make_server_app(cfg, on_summary=summary.update, on_error=errors.append),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
    )
    if errors:
        raise errors[0]
    if not summary:
        raise RuntimeError("the federation stopped before it finished; the log above says why")
    return summary
