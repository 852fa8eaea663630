"""Communication accounting: exact bytes per method and the paper's efficiency metric."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import EnergyThreshold, communication, efficiency, make_aggregator
from florist.errors import ConfigError
from florist.lora import ClientUpdate, LoraFactors
from tests.helpers import SHAPES, make_updates

RANKS = [8, 4, 2, 4]
M_PLUS_N = {name: m + n for name, (m, n) in SHAPES.items()}


def test_uplink_is_each_clients_own_factors(hetero_updates: list[ClientUpdate]) -> None:
    report = communication(hetero_updates, make_aggregator("flora").aggregate(hetero_updates), "bfloat16")
    for u, r in zip(hetero_updates, RANKS, strict=True):
        assert report.uplink[u.client_id] == {n: r * M_PLUS_N[n] * 2 for n in SHAPES}


def test_downlink_per_method(hetero_updates: list[ClientUpdate]) -> None:
    R = sum(RANKS)
    for method, want in {
        "flora": {c: {n: R * M_PLUS_N[n] * 4 for n in SHAPES} for c in range(4)},
        "fedit": {c: {n: RANKS[c] * M_PLUS_N[n] * 4 for n in SHAPES} for c in range(4)},
        "flexlora": {c: {n: RANKS[c] * M_PLUS_N[n] * 4 for n in SHAPES} for c in range(4)},
    }.items():
        report = communication(hetero_updates, make_aggregator(method).aggregate(hetero_updates))
        assert report.downlink == {f"client-{c}": v for c, v in want.items()}, method
    result = make_aggregator("florist", policy=EnergyThreshold(0.8)).aggregate(hetero_updates)
    report = communication(hetero_updates, result)
    for cid in report.downlink:
        assert report.downlink[cid] == {n: result.ranks[n] * M_PLUS_N[n] * 4 for n in SHAPES}
    assert report.downlink_total == 4 * sum(result.ranks[n] * M_PLUS_N[n] * 4 for n in SHAPES)


def test_ffa_moves_only_b() -> None:
    updates = make_updates(RANKS, shared_a=True)
    report = communication(updates, make_aggregator("ffa").aggregate(updates), "float16")
    for u, r in zip(updates, RANKS, strict=True):
        want = {n: SHAPES[n][0] * r * 2 for n in SHAPES}
        assert report.uplink[u.client_id] == want
        assert report.downlink[u.client_id] == want


def _tinyllama_qv(K: int, r: int) -> list[ClientUpdate]:
    """TinyLlama's 22 layers of q and v (tiny stand-in matrices: the metric counts ranks only)."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(22) for p in ("q_proj", "v_proj")]
    return [
        ClientUpdate(
            f"c{k}",
            1.0,
            {n: LoraFactors(torch.randn(r, 20, generator=g), torch.randn(20, r, generator=g)) for n in names},
        )
        for k in range(K)
    ]


def test_efficiency_matches_the_papers_table_1_units() -> None:
    updates = _tinyllama_qv(K=8, r=16)
    assert efficiency(make_aggregator("fedit").aggregate(updates)) == pytest.approx(14.20, abs=0.005)
    assert efficiency(make_aggregator("flora").aggregate(updates)) == pytest.approx(1.78, abs=0.005)


def test_unknown_wire_dtype_is_named(hetero_updates: list[ClientUpdate]) -> None:
    result = make_aggregator("flora").aggregate(hetero_updates)
    with pytest.raises(ConfigError, match="wire dtype must be one of .* got 'int8'"):
        communication(hetero_updates, result, "int8")
