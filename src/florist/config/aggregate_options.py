"""How a method aggregates: its rank policy (tau, rank or byte budget), compute dtype and basis.

Shared by ``florist aggregate``'s flags and the config's ``[aggregation]`` section, and the one place
that turns them into an aggregator's keyword options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from florist.aggregation import (
    ByteBudget,
    EnergyThreshold,
    FixedRank,
    RankPolicy,
    make_aggregator,
    wire_bytes,
)
from florist.aggregation.base import Aggregator, aggregator_class
from florist.dtypes import COMPUTE, torch_dtype
from florist.errors import ConfigError


@dataclass(frozen=True)
class AggregateOptions:
    method: str = "florist"
    tau: float | None = None
    rank: int | None = None
    budget_mb: float | None = None
    min_rank: int = 1
    max_rank: int | None = None
    weights: tuple[float, ...] | None = None
    wire_dtype: str = "float32"
    dtype: str = "float32"
    basis: str = "qr"
    overwrite: bool = False

    def policy(self) -> RankPolicy:
        chosen = [x is not None for x in (self.tau, self.rank, self.budget_mb)]
        if sum(chosen) > 1:
            raise ConfigError("give at most one of --tau, --rank and --budget-mb")
        if self.rank is not None:
            return FixedRank(self.rank)
        if self.budget_mb is not None:
            if not (math.isfinite(self.budget_mb) and self.budget_mb > 0):
                raise ConfigError(
                    f"budget_mb (--budget-mb, aggregation.budget_mb) must be > 0, got {self.budget_mb!r}"
                )
            budget = int(self.budget_mb * 1_000_000)
            return ByteBudget(budget, min_rank=self.min_rank, max_rank=self.max_rank)
        return EnergyThreshold(0.9 if self.tau is None else self.tau, self.min_rank, self.max_rank)

    def build(self) -> Aggregator:
        """The aggregator these options describe (the one place one is made from options)."""
        return make_aggregator(self.method, **self.aggregator_options())

    def aggregator_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"dtype": torch_dtype(self.dtype, "--dtype (aggregation.dtype)", COMPUTE)}
        if aggregator_class(self.method).rank_policy:
            opts |= {"policy": self.policy(), "basis": self.basis, "wire_bytes": wire_bytes(self.wire_dtype)}
        elif (self.tau, self.rank, self.budget_mb) != (None, None, None):
            raise ConfigError(f"--tau, --rank and --budget-mb apply to --method florist, not {self.method!r}")
        return opts
