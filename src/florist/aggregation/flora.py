"""FLoRA: send the whole stack. Exact, rank ``R = sum_k r_k`` per module.

    B_g = [B_1 ... B_K]  (m, R),   A_g = [p_1 A_1; ...; p_K A_K]  (R, n)
    B_g @ A_g == sum_k p_k B_k A_k

Each client's factors are first re-factored (``rebalanced``: ``U sqrt(S)``, ``sqrt(S) V^T`` of its own
``s_k B_k A_k``, the same rank): the stack is sent to every client, so a client's choice of
factorisation (a near-zero B beside a huge A, columns that cancel) must not reach the others. FLoRIST
and FlexLoRA need no such step: what they send are singular factors of the aggregate.

Clients merge ``B_g @ A_g`` into their base weights and start a fresh LoRA. The global adapter's
scaling is 1 (the clients' ``alpha / r_k`` is already folded into ``B_k``): the FLoRA code's
``alpha * K / sum(r_k)`` scaling for mixed ranks shrinks the update and is not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from florist.aggregation.base import AggregationResult, Aggregator, ClientProtocol, module_names, register
from florist.aggregation.linalg import stack_module
from florist.aggregation.lowrank import rebalanced
from florist.lora.update import ClientUpdate, LoraFactors


@register("flora")
@dataclass(frozen=True)
class Flora(Aggregator):
    """FLoRA stacking.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.MERGE_AND_RESTART
    exact = True
    products_only = True
    label = "FLoRA"

    @classmethod
    def download_rank(cls, ranks: Sequence[int], m: int, n: int, fixed_rank: int | None = None) -> int:
        return sum(ranks)  # the whole stack

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        # what reaches the clients is the stack: no client's factorisation is passed on (re-factored in
        # float64, so the exact reference stays exact to the compute dtype's rounding)
        updates = [
            replace(u, modules={n: rebalanced(f, torch.float64) for n, f in u.modules.items()})
            for u in updates
        ]
        global_update = {}
        for name in module_names(updates):
            B, A = stack_module(updates, weights, name, self.dtype)  # (m, R), (R, n)
            global_update[name] = LoraFactors(A=A, B=B)
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            energy_kept={name: 1.0 for name in global_update},
        )
