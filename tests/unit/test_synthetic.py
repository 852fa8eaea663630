"""The demo's synthetic client adapters: declared ranks, realistic size, ranks that vary with depth."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import EnergyThreshold, make_aggregator
from florist.lora import ClientUpdate
from florist.lora.synthetic import RELATIVE_NORM, synthetic_clients


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.self_attn.{t}": torch.randn(48 if t == "v_proj" else 96, 96, generator=g)
        for i in range(6)
        for t in ("q_proj", "v_proj")
    }


def test_clients_have_their_rank_and_a_realistic_size() -> None:
    weights = _weights()
    clients = synthetic_clients(weights, [16, 8, 4])
    for rank, modules in zip([16, 8, 4], clients, strict=True):
        for name, f in modules.items():
            assert f.rank == rank and f.scaling == pytest.approx(2.0)
            ratio = float(f.delta().norm() / weights[name].norm())
            assert ratio == pytest.approx(
                RELATIVE_NORM, rel=0.05
            )  # own directions are not orthogonal to shared ones


def test_deeper_layers_keep_more_rank() -> None:
    clients = synthetic_clients(_weights(), [16, 16, 8, 8])
    updates = [ClientUpdate(f"c{k}", 1.0 + k, m) for k, m in enumerate(clients)]
    ranks = make_aggregator("florist", policy=EnergyThreshold(0.9)).aggregate(updates).ranks
    first, last = ranks["model.layers.0.self_attn.v_proj"], ranks["model.layers.5.self_attn.v_proj"]
    assert first < last, ranks
