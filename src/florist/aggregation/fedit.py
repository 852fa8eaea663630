"""FedIT: average A and B separately (FedAvg on the LoRA factors). Inexact.

    A_g = sum_k p_k A_k  (r, n),   B_g = sum_k p_k B_k  (m, r)
    B_g @ A_g = sum_k sum_l p_k p_l B_k A_l  !=  sum_k p_k B_k A_k   (cross terms k != l)

It is exact only when every A_k is the same. With mixed ranks, A_k and B_k are zero-padded to the
largest rank before averaging and each client continues from its own rank's leading slice of the
global factors (HetLoRA-style).
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
from florist.aggregation.linalg import pad_cols, pad_rows
from florist.lora.update import ClientUpdate, LoraFactors


def average_factors(
    updates: Sequence[ClientUpdate], weights: Tensor, module: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Weighted averages of zero-padded effective ``B_k`` and ``A_k``: ``(m, r_max)``, ``(r_max, n)``."""
    r_max = max(u.modules[module].rank for u in updates)
    Bs, As = [], []
    for update, p in zip(updates, weights.tolist(), strict=True):
        B, A = update.modules[module].effective(dtype)  # (m, r_k), (r_k, n)
        Bs.append(pad_cols(B, r_max) * p)
        As.append(pad_rows(A, r_max) * p)
    return torch.stack(Bs).sum(0), torch.stack(As).sum(0)  # (m, r_max), (r_max, n)


@register("fedit")
@dataclass(frozen=True)
class FedIT(Aggregator):
    """FedIT: separate weighted averages of A and B.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.CONTINUE_GLOBAL
    exact = False
    products_only = False
    label = "FedIT"

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        global_update = {}
        for name in module_names(updates):
            B_g, A_g = average_factors(updates, weights, name, self.dtype)
            global_update[name] = LoraFactors(A=A_g, B=B_g)
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            per_client=per_client_slices(updates, global_update),
        )
