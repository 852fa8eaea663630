"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's averages plus the residual that makes them exact.

Clients continue from the averaged adapter, and the server sends the residual
``sum_k p_k B_k A_k - B_avg A_avg`` that every client adds to its frozen base weights, so the
global model is the exact FedAvg of the clients' models. florist sends it as one merge:

    G_t = [B_avg | B_rest]  (m, r_max + q),   A_G = [A_avg; A_rest]  (r_max + q, n)
    B_avg = sum_k p_k pad(B_k),   A_avg = sum_k p_k pad(A_k)             FedIT's zero-padded averages
    B_rest A_rest = sum_k p_k (B_k A_k - S_k) - B_avg A_avg               S_k: client k's start

A client merges ``G_t`` into its base and moves the leading ``r_k`` columns of ``(B_G, A_G)`` (its
rank's slice of the averages) back into its LoRA (``ClientProtocol.MERGE_AND_CONTINUE``): its base
then holds ``W0 + sum of residuals``, its LoRA the averages, as in the paper, and a client that
skipped rounds catches up by merging the rounds it missed. ``G_t == sum_k p_k (B_k A_k - S_k)``,
the exact aggregate of the round's changes; the start ``S_k`` is the slice of ``G_{t-1}`` the
client continued from (zero in round 1).

The residual is never formed as an ``(m, n)`` matrix. Its factored form has rank at most
``R + r_max`` (``R = sum_k r_k``; the averages' product lies in the span of the stacked factors up to
their rounding, the starts add at most ``r_max``), found from the factored SVD and cut where the
singular values reach the rounding of the dtype it is sent in. A client downloads at most
``(R + 2 r_max)(m + n)`` numbers per module, against ``m n + r_max (m + n)`` for the paper's dense
residual plus averages: florist sends the factored form, which is smaller whenever
``(R + r_max)(m + n) < m n`` (SmolLM2's q_proj, 8 clients of rank 16: at most 184,320 numbers
against 350,208).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.base import AggregationResult, Aggregator, ClientProtocol, module_names, register
from florist.aggregation.fedit import average_factors
from florist.aggregation.linalg import factored_svd, stack_module
from florist.lora.update import ClientUpdate, LoraFactors


def change_stack(
    updates: Sequence[ClientUpdate], weights: Tensor, module: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Factors of ``sum_k p_k (B_k A_k - S_k)``: the stacks of the uploads (``stack_module``), then
    ``-S_k`` of every client that started from one; ``(m, R + R_s)`` and ``(R + R_s, n)``."""
    B, A = stack_module(updates, weights, module, dtype)  # (m, R), (R, n)
    Bs, As = [B], [A]
    for update, p in zip(updates, weights.tolist(), strict=True):
        if update.start is not None:
            B_s, A_s = update.start[module].effective(dtype)  # (m, s_k), (s_k, n)
            Bs.append(-B_s)
            As.append(A_s * p)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def residual_factors(B: Tensor, A: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``B @ A`` cut to its numerical rank: ``(m, q)``, ``(q, n)``, computed in float64.

    Singular values below ``eps(dtype) ||B||_F ||A||_F`` are dropped: that is the rounding of the
    ``dtype`` the update is sent in (the cancellation inside ``B @ A`` leaves directions of that
    size, e.g. from the averages rounded to float32); the rank kept is at most ``R + r_max``."""
    B, A = B.double(), A.double()
    svd = factored_svd(B, A)
    tol = torch.finfo(dtype).eps * float(B.norm()) * float(A.norm())
    return svd.truncate(int((tol < svd.S).sum()))


@register("fedex")
@dataclass(frozen=True)
class FedExLoRA(Aggregator):
    """FedEx-LoRA: continue from the averages, merge the exact residual.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.MERGE_AND_CONTINUE
    exact = True
    products_only = False  # the averages need each client's factors as trained
    label = "FedEx-LoRA"

    @classmethod
    def download_rank(cls, ranks: Sequence[int], m: int, n: int, fixed_rank: int | None = None) -> int:
        return min(sum(ranks) + max(ranks), m, n) + max(ranks)  # averages + residual at most

    @classmethod
    def download_is_bound(cls, fixed_rank: int | None = None, budget_mb: float | None = None) -> bool:
        return True

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        global_update = {name: self._module(updates, weights, name) for name in module_names(updates)}
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            energy_kept=dict.fromkeys(global_update, 1.0),
        )

    def _module(self, updates: Sequence[ClientUpdate], weights: Tensor, name: str) -> LoraFactors:
        B_avg, A_avg = average_factors(updates, weights, name, self.dtype)  # (m, r_max), (r_max, n)
        B_c, A_c = change_stack(updates, weights, name, self.dtype)  # (m, R'), (R', n)
        B_res = torch.cat([B_c, -B_avg], dim=1)  # (m, R' + r_max)
        A_res = torch.cat([A_c, A_avg], dim=0)  # (R' + r_max, n):  B_res @ A_res = change - avg
        B_rest, A_rest = residual_factors(B_res, A_res, self.dtype)  # (m, q), (q, n)
        A_g = torch.cat([A_avg, A_rest.to(self.dtype)])  # (r_max + q, n)
        return LoraFactors(A=A_g, B=torch.cat([B_avg, B_rest.to(self.dtype)], dim=1))
