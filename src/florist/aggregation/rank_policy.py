"""How many singular directions FLoRIST keeps per adapted matrix.

Every policy maps ``{module: singular values}`` (descending) and ``{module: bytes per rank}``
(``(m + n) * bytes_per_element`` on the wire) to ``{module: rank}``.

- ``EnergyThreshold(tau)``: per module, the smallest ``p`` with
  ``sum(S[:p]^2) >= tau * sum(S^2)`` (the paper's rule), clamped to ``[min_rank, max_rank]``.
- ``FixedRank(rank)``: the same ``p`` everywhere (capped by the available rank).
- ``NoiseThreshold()``: under client-level DP, per module the singular values above Gavish and
  Donoho's optimal hard threshold for the known noise level (``florist.privacy.client_level``).
- ``ByteBudget(budget_bytes)``: ranks of all modules chosen jointly so the download fits the
  budget and the kept energy ``sum_j sum_{i<p_j} S_j[i]^2`` is maximal (a knapsack, see below).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from florist.aggregation.linalg import energy_fraction
from florist.errors import ConfigError

# Slack on the energy comparison, so tau = 1 keeps every singular value that is not rounding noise.
ENERGY_SLACK = 1e-12


class RankPolicy(Protocol):
    def choose(self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int]) -> dict[str, int]:
        """Rank per module."""
        ...


def _check_rank_bounds(min_rank: int, max_rank: int | None) -> None:
    if min_rank < 1:
        raise ConfigError(f"min_rank must be at least 1, got {min_rank}")
    if max_rank is not None and max_rank < min_rank:
        raise ConfigError(f"max_rank must be >= min_rank ({min_rank}), got {max_rank}")


def _clamp(p: int, available: int, min_rank: int, max_rank: int | None) -> int:
    hi = available if max_rank is None else min(max_rank, available)
    return max(1, min(max(p, min_rank), hi))


def rank_for_energy(S: Tensor, tau: float) -> int:
    """Smallest ``p >= 1`` whose first ``p`` squared singular values hold ``tau`` of the energy."""
    frac = energy_fraction(S)
    hits = (frac >= tau - ENERGY_SLACK).nonzero()
    return int(hits[0]) + 1 if hits.numel() else int(S.numel())


@dataclass(frozen=True)
class EnergyThreshold:
    tau: float
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"tau must be in (0, 1], got {self.tau}")
        _check_rank_bounds(self.min_rank, self.max_rank)

    def choose(self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int]) -> dict[str, int]:
        return {
            name: _clamp(rank_for_energy(S, self.tau), S.numel(), self.min_rank, self.max_rank)
            for name, S in spectra.items()
        }


def hard_threshold(m: int, n: int, std: float) -> float:
    """Gavish and Donoho's optimal hard threshold for the singular values of an m x n matrix with
    i.i.d. N(0, std^2) noise: lambda*(beta) sqrt(max(m, n)) std, beta = min / max,
    lambda*(beta) = sqrt(2 (beta + 1) + 8 beta / ((beta + 1) + sqrt(beta^2 + 14 beta + 1)))."""
    beta = min(m, n) / max(m, n)
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta * beta + 14 * beta + 1)))
    return lam * math.sqrt(max(m, n)) * std


@dataclass(frozen=True)
class NoiseThreshold:
    """Keep the singular values above the optimal hard threshold of the noise (client-level DP): the
    aggregator gives the noise's per-entry std and each module's shape (``ranks``)."""

    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        _check_rank_bounds(self.min_rank, self.max_rank)

    def choose(self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int]) -> dict[str, int]:
        raise ConfigError(
            "aggregation.rank_policy = 'noise' needs the noise level: it applies with privacy.mode = 'client'"
        )

    def ranks(
        self, spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]], std: float
    ) -> dict[str, int]:
        out = {}
        for name, S in spectra.items():
            cut = hard_threshold(*shapes[name], std)
            out[name] = _clamp(int((cut < S).sum()), S.numel(), self.min_rank, self.max_rank)
        return out


@dataclass(frozen=True)
class FixedRank:
    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be at least 1, got {self.rank}")

    def choose(self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int]) -> dict[str, int]:
        return {name: min(self.rank, S.numel()) for name, S in spectra.items()}


@dataclass(frozen=True)
class ByteBudget:
    """Download budget per client per round, in bytes, shared by all modules.

    Choosing a rank per module to maximise kept energy under a byte budget is a multiple-choice
    knapsack. It is solved exactly by dynamic programming over a byte grid (the gcd of the
    per-rank costs; a coarser grid, with costs rounded up, when that would exceed ``max_grid``
    cells) and by the greedy "most energy per byte first" rule; the better of the two is kept.
    """

    budget_bytes: int
    min_rank: int = 1
    max_rank: int | None = None
    max_grid: int = 1 << 14

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ConfigError(f"budget_bytes must be positive, got {self.budget_bytes}")
        _check_rank_bounds(self.min_rank, self.max_rank)

    def choose(self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int]) -> dict[str, int]:
        names = sorted(spectra)
        floor = {n: min(self.min_rank, spectra[n].numel()) for n in names}
        floor_bytes = sum(floor[n] * bytes_per_rank[n] for n in names)
        if floor_bytes > self.budget_bytes:
            raise ConfigError(
                f"budget of {self.budget_bytes} bytes is below the {floor_bytes} bytes needed to keep rank "
                f"{self.min_rank} on each of the {len(names)} modules"
            )
        gains = {n: self._gains(spectra[n], floor[n]) for n in names}
        left = self.budget_bytes - floor_bytes
        extra = max(
            (_knapsack(gains, bytes_per_rank, left, self.max_grid), _greedy(gains, bytes_per_rank, left)),
            key=lambda e: _gain(gains, e),
        )
        return {n: floor[n] + extra[n] for n in names}

    def _gains(self, S: Tensor, floor: int) -> list[float]:
        """Energy of each value a module can add beyond its floor, in order."""
        hi = S.numel() if self.max_rank is None else min(self.max_rank, S.numel())
        return S.double().square().tolist()[floor:hi]


def _gain(gains: Mapping[str, list[float]], extra: Mapping[str, int]) -> float:
    return sum(sum(gains[n][: extra[n]]) for n in gains)


def _greedy(gains: Mapping[str, list[float]], cost: Mapping[str, int], budget: int) -> dict[str, int]:
    """Most energy per byte first; a module whose next value does not fit is closed."""
    items = [(g / cost[n], n, i) for n, gs in gains.items() for i, g in enumerate(gs)]
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    extra = dict.fromkeys(gains, 0)
    closed: set[str] = set()
    for _, name, i in items:
        if name in closed or i != extra[name]:
            continue
        if cost[name] > budget:
            closed.add(name)  # later values of this module would break the prefix
            continue
        extra[name], budget = i + 1, budget - cost[name]
    return extra


def _knapsack(
    gains: Mapping[str, list[float]], cost: Mapping[str, int], budget: int, max_grid: int
) -> dict[str, int]:
    """Exact multiple-choice knapsack over a byte grid: how many extra values per module."""
    unit = math.gcd(*cost.values())
    if budget // unit > max_grid:
        unit = -(-budget // max_grid)  # coarser grid; costs rounded up stay feasible
    cap = budget // unit
    best = torch.zeros(cap + 1, dtype=torch.float64)  # best[b]: max energy within b grid cells
    cells = torch.arange(cap + 1)
    choices = []
    for name, gs in gains.items():
        w = -(-cost[name] // unit)
        T = min(len(gs), cap // w)
        cum = torch.tensor([0.0, *itertools.accumulate(gs[:T])], dtype=torch.float64)  # (T + 1,)
        src = cells[None, :] - w * torch.arange(T + 1)[:, None]  # (T + 1, cap + 1)
        cand = torch.where(src >= 0, best[src.clamp(min=0)] + cum[:, None], -math.inf)
        best, pick = cand.max(dim=0)  # first maximum: fewest values among ties
        choices.append((name, w, pick))
    extra, b = {}, cap
    for name, w, pick in reversed(choices):
        extra[name] = int(pick[b])
        b -= extra[name] * w
    return extra
