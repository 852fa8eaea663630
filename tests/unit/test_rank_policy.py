"""Rank policies: energy threshold, fixed rank and the joint byte budget."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import ByteBudget, EnergyThreshold, FixedRank
from florist.aggregation.rank_policy import rank_for_energy
from florist.errors import ConfigError


def _spectra(seed: int, modules: int = 12) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Random descending spectra of varied length and decay, and mixed per-rank byte costs."""
    g = torch.Generator().manual_seed(seed)
    spectra, cost = {}, {}
    for j in range(modules):
        length = int(torch.randint(4, 40, (1,), generator=g))
        decay = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        scale = float(torch.rand(1, generator=g)) * 5 + 0.1
        noise = 1 + 0.2 * torch.rand(length, generator=g, dtype=torch.float64)
        S = (scale * decay ** torch.arange(length, dtype=torch.float64) * noise).sort(descending=True).values
        spectra[f"m{j:02d}"] = S
        cost[f"m{j:02d}"] = [768, 1152, 2112, 4096][j % 4]
    return spectra, cost


def _energy(spectra: dict[str, torch.Tensor], ranks: dict[str, int]) -> float:
    return sum(float(S[: ranks[n]].square().sum()) for n, S in spectra.items())


def _bytes(cost: dict[str, int], ranks: dict[str, int]) -> int:
    return sum(cost[n] * r for n, r in ranks.items())


def test_energy_rank_is_the_smallest_that_reaches_tau() -> None:
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(S, 13 / 14) == 2
    assert rank_for_energy(S, 1.0) == 3, "a zero singular value is never needed"


@pytest.mark.parametrize("seed", range(8))
def test_budget_fits_and_beats_every_uniform_tau_with_the_same_bytes(seed: int) -> None:
    spectra, cost = _spectra(seed)
    for tau in [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]:
        uniform = EnergyThreshold(tau).choose(spectra, cost)
        budget = _bytes(cost, uniform)
        chosen = ByteBudget(budget).choose(spectra, cost)
        assert _bytes(cost, chosen) <= budget
        assert _energy(spectra, chosen) >= _energy(spectra, uniform) * (1 - 1e-12), (seed, tau)


def test_budget_respects_rank_bounds_and_refuses_an_impossible_budget() -> None:
    spectra, cost = _spectra(0)
    ranks = ByteBudget(10**9, min_rank=2, max_rank=5).choose(spectra, cost)
    assert all(2 <= r <= 5 for r in ranks.values())
    with pytest.raises(
        ConfigError, match=r"budget of 100 bytes is below the \d+ bytes needed to keep rank 1"
    ):
        ByteBudget(100).choose(spectra, cost)


def test_fixed_rank_is_capped_by_what_exists() -> None:
    spectra = {"a": torch.ones(3), "b": torch.ones(10)}
    assert FixedRank(5).choose(spectra, {"a": 1, "b": 1}) == {"a": 3, "b": 5}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EnergyThreshold(0.0), r"tau must be in \(0, 1\], got 0.0"),
        (lambda: EnergyThreshold(1.5), r"tau must be in \(0, 1\], got 1.5"),
        (lambda: EnergyThreshold(0.9, min_rank=0), "min_rank must be at least 1, got 0"),
        (lambda: EnergyThreshold(0.9, min_rank=4, max_rank=2), r"max_rank must be >= min_rank \(4\), got 2"),
        (lambda: FixedRank(0), "rank must be at least 1, got 0"),
        (lambda: ByteBudget(0), "budget_bytes must be positive, got 0"),
    ],
)
def test_bad_policy_values_are_named(make: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()  # type: ignore[operator]
