"""Flower's simulation runtime, in this process: the ServerApp here, each client node's ClientApp in a
Ray actor that keeps its model loaded across rounds. The same apps run under ``flwr run`` and on a
deployment (README, "Flower").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from florist.config import FloristConfig


def backend_config(cfg: FloristConfig) -> dict[str, Any]:
    """Ray resources: each client gets ``cpus_per_client`` cores (at most all of them) and its GPU share."""
    cores = os.cpu_count() or 1
    cpus = min(float(cores), cfg.federation.cpus_per_client)
    resources: dict[str, Any] = {"num_cpus": cpus, "num_gpus": cfg.federation.gpus_per_client}
    return {"client_resources": resources, "init_args": {"num_cpus": cores, "log_to_driver": True}}


def run_simulation(cfg: FloristConfig) -> dict[str, Any]:
    """Run ``cfg`` to the end; returns the summary that RUN/summary.json also holds."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from florist.flower.client_app import make_client_app
    from florist.flower.server_app import make_server_app

    if cfg.run.resume:  # refuse a changed config or a missing checkpoint before Ray starts
        from florist.server.checkpoint import load_latest

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
