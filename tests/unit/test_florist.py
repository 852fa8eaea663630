"""FLoRIST against a dense reference: exactness at tau = 1, Eckart–Young below it."""

from __future__ import annotations

import random

import pytest
import torch

from florist.aggregation import EnergyThreshold, FixedRank, make_aggregator
from florist.aggregation.linalg import energy_fraction
from florist.aggregation.rank_policy import ENERGY_SLACK
from tests.helpers import SHAPES, assert_product_close, best_rank_p, dense_reference, make_updates


@pytest.mark.parametrize("basis", ["qr", "svd"])
@pytest.mark.parametrize("ranks", [[4, 4, 4], [8, 4, 2, 4], [16, 1]])
def test_tau_one_equals_exact_aggregate(ranks: list[int], basis: str) -> None:
    updates = make_updates(ranks)
    result = make_aggregator("florist", policy=EnergyThreshold(1.0), basis=basis).aggregate(updates)
    for name in SHAPES:
        assert_product_close(result.global_update[name].delta(), dense_reference(updates, name), rtol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.97])
def test_tau_below_one_is_best_rank_p_with_minimal_p(tau: float) -> None:
    updates = make_updates([8, 4, 2, 4], seed=3)
    result = make_aggregator("florist", policy=EnergyThreshold(tau)).aggregate(updates)
    for name in SHAPES:
        dense = dense_reference(updates, name)
        S = torch.linalg.svdvals(dense)
        p = result.ranks[name]
        frac = energy_fraction(S)
        assert frac[p - 1] >= tau - ENERGY_SLACK, "kept too little energy"
        assert p == 1 or frac[p - 2] < tau, "a smaller rank would have kept tau of the energy"
        assert_product_close(result.global_update[name].delta(), best_rank_p(dense, p), rtol=1e-4)
        assert result.energy_kept is not None
        assert result.energy_kept[name] == pytest.approx(float(frac[p - 1]), rel=1e-5)


def test_ranks_differ_between_modules_with_different_spectra() -> None:
    shapes = {"fast": (48, 40), "slow": (48, 40), "flat": (48, 40)}
    decay = {"fast": 0.3, "slow": 0.8, "flat": 1.0}
    updates = make_updates([8, 8, 8], shapes=shapes, decay=decay, seed=1)
    ranks = make_aggregator("florist", policy=EnergyThreshold(0.9)).aggregate(updates).ranks
    assert ranks["fast"] < ranks["slow"] < ranks["flat"], ranks


def test_min_and_max_rank_bound_the_choice() -> None:
    updates = make_updates([8, 8], seed=2)
    ranks = (
        make_aggregator("florist", policy=EnergyThreshold(0.3, min_rank=3, max_rank=5))
        .aggregate(updates)
        .ranks
    )
    assert all(3 <= r <= 5 for r in ranks.values())
    assert make_aggregator("florist", policy=EnergyThreshold(1.0, max_rank=2)).aggregate(updates).ranks == {
        name: 2 for name in SHAPES
    }


def test_fixed_rank_is_best_rank_p() -> None:
    updates = make_updates([8, 4, 2])
    result = make_aggregator("florist", policy=FixedRank(3)).aggregate(updates)
    for name in SHAPES:
        assert result.ranks[name] == 3
        assert_product_close(
            result.global_update[name].delta(), best_rank_p(dense_reference(updates, name), 3), rtol=1e-4
        )


def test_result_does_not_depend_on_arrival_order() -> None:
    updates = make_updates([8, 4, 2, 4])
    shuffled = updates[:]
    random.Random(0).shuffle(shuffled)
    agg = make_aggregator("florist", policy=EnergyThreshold(0.9))
    a, b = agg.aggregate(updates), agg.aggregate(shuffled)
    assert a.client_ids == b.client_ids == tuple(sorted(u.client_id for u in updates))
    for name in SHAPES:
        assert torch.equal(a.global_update[name].B, b.global_update[name].B)
        assert torch.equal(a.global_update[name].A, b.global_update[name].A)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_clients_are_computed_in_float32(dtype: torch.dtype) -> None:
    updates = make_updates([4, 4, 2], dtype=dtype)
    result = make_aggregator("florist", policy=EnergyThreshold(1.0)).aggregate(updates)
    for name in SHAPES:
        assert result.global_update[name].B.dtype == torch.float32
        assert_product_close(result.global_update[name].delta(), dense_reference(updates, name), rtol=1e-5)


def test_float64_on_request_is_tighter() -> None:
    updates = make_updates([8, 4, 2, 4])
    result = make_aggregator("florist", policy=EnergyThreshold(1.0), dtype=torch.float64).aggregate(updates)
    for name in SHAPES:
        assert result.global_update[name].B.dtype == torch.float64
        assert_product_close(
            result.global_update[name].delta(torch.float64), dense_reference(updates, name), 1e-11
        )


@pytest.mark.parametrize("method", ["florist", "flora", "fedit", "flexlora", "ffa"])
def test_all_zero_update_gives_zero_and_no_nan(method: str) -> None:
    updates = make_updates([4, 2, 4], shared_a=(method == "ffa"))
    zeroed = [
        type(u)(
            u.client_id,
            u.num_examples,
            {n: type(f)(f.A, torch.zeros_like(f.B), f.scaling) for n, f in u.modules.items()},
        )
        for u in updates
    ]
    result = make_aggregator(method).aggregate(zeroed)
    for name, f in result.global_update.items():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all(), name
        assert torch.count_nonzero(f.delta()) == 0, name
