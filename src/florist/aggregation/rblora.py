"""RB-LoRA (Findings of EACL 2026; public code seonha01/rb-lora, ``aggregation.py``): FedIT's zero-padded
averages, with each rank slot weighted only by the clients that have it. Inexact.

    slot j (column j of B, row j of A):   w_kj = n_k / sum_{l: r_l > j} n_l   for r_k > j, else 0
    B_g[:, j] = sum_k w_kj B_k[:, j]   (m, r_max),    A_g[j] = sum_k w_kj A_k[j]   (r_max, n)

FedIT's plain average dilutes slot j by the clients of rank <= j, whose padded zeros pull it toward
zero; RB-LoRA renormalises per slot (the factor N / sum_{k: r_k > j} n_k on top of p_k). With equal
ranks it is FedIT. Clients continue from their own rank's slice of the global factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.base import (
    AggregationResult,
    Aggregator,
    ClientProtocol,
    module_names,
    per_client_slices,
    register,
)
from florist.aggregation.fedit import average_factors
from florist.lora.update import ClientUpdate, LoraFactors


def slot_weights(ranks: Sequence[int], weights: Tensor) -> Tensor:
    """``sum_{k: r_k > j} p_k`` for every slot ``j < r_max``: ``(r_max,)``, each > 0."""
    r = torch.tensor(list(ranks))  # (K,)
    has = r[:, None] > torch.arange(int(r.max()))[None, :]  # (K, r_max): client k has slot j
    return (weights[:, None].to(torch.float64) * has).sum(0)  # (r_max,)


@register("rblora")
@dataclass(frozen=True)
class RBLoRA(Aggregator):
    """RB-LoRA: per-slot renormalised averages of zero-padded A and B.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.CONTINUE_GLOBAL
    exact = False
    products_only = False
    label = "RB-LoRA"

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        global_update = {}
        for name in module_names(updates):
            B_g, A_g = average_factors(updates, weights, name, self.dtype)  # (m, r_max), (r_max, n)
            scale = slot_weights([u.modules[name].rank for u in updates], weights).to(self.dtype)  # (r_max,)
            global_update[name] = LoraFactors(A=A_g / scale[:, None], B=B_g / scale[None, :])
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            per_client=per_client_slices(updates, global_update),
        )
