"""Aggregation engine: one method per file, found by name in a registry. Pure tensor code.

>>> from florist.aggregation import make_aggregator, EnergyThreshold
>>> agg = make_aggregator("florist", policy=EnergyThreshold(0.9))
>>> result = agg.aggregate(client_updates)          # doctest: +SKIP
"""

from florist.aggregation import fedex, fedit, fedsb, fedsvd, ffa, flexlora, flora, florist, rblora  # noqa: F401  (registers methods)
from florist.aggregation.base import (
    AggregationResult,
    Aggregator,
    ClientProtocol,
    available,
    make_aggregator,
)
from florist.aggregation.comm import CommReport, communication, download_ranks, efficiency, wire_bytes
from florist.aggregation.linalg import ThinSVD, factored_svd
from florist.aggregation.rank_policy import ByteBudget, EnergyThreshold, FixedRank, RankPolicy

__all__ = [
    "AggregationResult",
    "Aggregator",
    "ByteBudget",
    "ClientProtocol",
    "CommReport",
    "EnergyThreshold",
    "FixedRank",
    "RankPolicy",
    "ThinSVD",
    "available",
    "communication",
    "download_ranks",
    "efficiency",
    "factored_svd",
    "make_aggregator",
    "wire_bytes",
]
