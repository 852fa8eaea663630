"""How many singular directions FLoRIST keeps per adapted matrix.

Every policy maps ``{module: singular values}`` (descending) and ``{module: bytes per rank}``
(``(m + n) * bytes_per_element`` on the wire) to ``{module: rank}``.

- ``EnergyThreshold(tau)``: per module, the smallest ``p`` with
  ``sum(S[:p]^2) >= tau * sum(S^2)`` (the paper's rule), clamped to ``[min_rank, max_rank]``.
- ``FixedRank(rank)``: the same ``p`` everywhere (capped by the available rank).
- ``ByteBudget(budget_bytes)``: ranks of all modules chosen jointly so the download fits the
  budget and the kept energy ``sum_j sum_{i<p_j} S_j[i]^2`` is as large as the greedy
  "most energy per byte first" rule can make it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

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
    """Download budget per client per round, in bytes, shared by all modules."""

    budget_bytes: int
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ConfigError(f"budget_bytes must be positive, got {self.budget_bytes}")
        _check_rank_bounds(self.min_rank, self.max_rank)

    def choose(self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int]) -> dict[str, int]:
        names = sorted(spectra)
        ranks = {n: min(self.min_rank, spectra[n].numel()) for n in names}
        floor = sum(ranks[n] * bytes_per_rank[n] for n in names)
        if floor > self.budget_bytes:
            raise ConfigError(
                f"budget of {self.budget_bytes} bytes is below the {floor} bytes needed to keep rank "
                f"{self.min_rank} on each of the {len(names)} modules"
            )
        left = self.budget_bytes - floor
        closed: set[str] = set()
        for _, name, i in self._candidates(spectra, bytes_per_rank, ranks):
            cost = bytes_per_rank[name]
            if name in closed or i != ranks[name]:
                continue
            if cost > left:
                closed.add(name)  # later values of this module would break the prefix
                continue
            ranks[name], left = i + 1, left - cost
        return ranks

    def _candidates(
        self, spectra: Mapping[str, Tensor], bytes_per_rank: Mapping[str, int], start: Mapping[str, int]
    ) -> list[tuple[float, str, int]]:
        """(energy per byte, module, index) of every value beyond the floor, best first."""
        items = []
        for name, S in spectra.items():
            hi = S.numel() if self.max_rank is None else min(self.max_rank, S.numel())
            energy = S.double().square().tolist()
            items += [(energy[i] / bytes_per_rank[name], name, i) for i in range(start[name], hi)]
        items.sort(key=lambda t: (-t[0], t[1], t[2]))
        return items
