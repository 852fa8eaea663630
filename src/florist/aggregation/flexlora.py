"""FlexLoRA: dense aggregate, full SVD, and a truncation to each client's own rank.

    delta W = sum_k p_k B_k A_k        (m, n), formed densely
    delta W = U diag(S) Vh             full (thin) SVD, O(m n min(m, n))
    client k gets  B'_k = U_{r_k} diag(S_{r_k}),  A'_k = Vh_{r_k}   and continues training them

r_k is the rank of client k's LoRA (``ClientUpdate.rank_of``), also when its upload was cut to a
lower rank by uplink thresholding.

Each client's truncation is its own (the public FLoRIST code wrote all of them into one shared
dict, so every client got the last one; not reproduced). ``global_update`` is the truncation at
the largest client rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.base import AggregationResult, Aggregator, ClientProtocol, module_names, register
from florist.aggregation.linalg import ThinSVD, dense_svd, energy_fraction, pad_cols, pad_rows
from florist.lora.update import ClientUpdate, LoraFactors


def dense_aggregate(
    updates: Sequence[ClientUpdate], weights: Tensor, module: str, dtype: torch.dtype
) -> Tensor:
    """``sum_k p_k B_k A_k`` as a dense ``(m, n)`` matrix."""
    delta: Tensor | None = None
    for update, p in zip(updates, weights.tolist(), strict=True):
        B, A = update.modules[module].effective(dtype)  # (m, r_k), (r_k, n)
        delta = torch.addmm(delta, B * p, A) if delta is not None else (B * p) @ A
    if delta is None:
        raise ValueError("dense_aggregate needs at least one update")
    return delta


@register("flexlora")
@dataclass(frozen=True)
class FlexLoRA(Aggregator):
    """FlexLoRA aggregation.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.CONTINUE_PER_CLIENT
    exact = False
    products_only = True
    label = "FlexLoRA"

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        svds: dict[str, ThinSVD] = {
            name: dense_svd(dense_aggregate(updates, weights, name, self.dtype))
            for name in module_names(updates)
        }
        per_client: dict[str, dict[str, LoraFactors]] = {}
        for update in updates:
            per_client[update.client_id] = {
                name: _factors(svd.truncate(update.rank_of(name)), update.rank_of(name))
                for name, svd in svds.items()
            }
        r_max = {name: max(u.rank_of(name) for u in updates) for name in svds}
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update={
                name: _factors(svd.truncate(r_max[name]), r_max[name]) for name, svd in svds.items()
            },
            per_client=per_client,
            energy_kept={
                n: float(energy_fraction(s.S)[min(r_max[n], len(s.S)) - 1]) for n, s in svds.items()
            },
            spectra={n: s.S for n, s in svds.items()},
        )


def _factors(BA: tuple[Tensor, Tensor], rank: int) -> LoraFactors:
    """Own copies (no client shares another's tensors), zero-padded to ``rank`` when the aggregate
    has fewer singular values than the client's rank (a rank above min(m, n))."""
    B, A = BA  # (m, p), (p, n) with p <= rank
    return LoraFactors(A=pad_rows(A, rank), B=pad_cols(B, rank))
