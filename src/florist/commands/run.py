"""``florist run CONFIG.toml [section.key=value ...]``: a federation on Flower's simulation runtime,
and ``florist demo``: the same on the packaged demo config (SmolLM2 + the skills set)."""

from __future__ import annotations

from collections.abc import Sequence

from florist.client.model import check_targets
from florist.config import DEMO_CONFIG, load_config
from florist.data.federated import check_data
from florist.flower.simulation import run_simulation
from florist.tables import print_summary


def run(config: str, overrides: Sequence[str], resume: bool = False, force: bool = False) -> None:
    flags = ["run.resume=true"] * resume + ["run.force=true"] * force
    cfg = load_config(config, [*overrides, *flags])
    check_data(cfg.data, cfg.federation.num_clients)  # a bad data file: one line, before any node starts
    check_targets(cfg.model.name, cfg.lora.target_modules)  # modules the model lacks or cannot adapt
    print_summary(run_simulation(cfg))


def demo(overrides: Sequence[str]) -> None:
    print_summary(run_simulation(load_config(DEMO_CONFIG, overrides)), demo=True)
