"""FFA-LoRA: A frozen and identical on every client (drawn from a shared seed), only B trained.

    A_k = A_shared[:r_k]  (frozen),   B_k zero-initialised and trained
    B_g = sum_k p_k pad(B_k)  (m, r_max)
    B_g @ A_shared == sum_k p_k B_k A_k                 (exact, because A is shared)

Clients upload and download only B (their own rank's leading columns of ``B_g``). The public
FLoRIST code froze B and trained A instead, which is not FFA-LoRA; not reproduced.
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
from florist.aggregation.linalg import pad_cols
from florist.errors import InvalidUpdate
from florist.lora.update import ClientUpdate, LoraFactors


def shared_a(
    updates: Sequence[ClientUpdate], module: str, dtype: torch.dtype, label: str = "FFA-LoRA"
) -> Tensor:
    """The shared frozen A (from the highest-rank client); every client's A must be its leading rows
    (``label``: the method that needs it, for the refusal)."""
    ref = max(updates, key=lambda u: u.modules[module].rank)
    A_ref = ref.modules[module].A.to(dtype)  # (r_max, n)
    for update in updates:
        A = update.modules[module].A
        tol = 4 * max(torch.finfo(A.dtype).eps, torch.finfo(ref.modules[module].A.dtype).eps)
        head = A_ref[: A.shape[0]]
        scale = float(head.abs().max()) if head.numel() else 0.0
        if not torch.allclose(A.to(dtype), head, rtol=tol, atol=tol * scale):
            diff = float((A.to(dtype) - head).abs().max())
            raise InvalidUpdate(
                update.client_id,
                f"lora_A differs from the shared frozen A of client {ref.client_id!r} "
                f"(max abs difference {diff:.3g}); {label} needs every client to keep the shared frozen A",
                module=module,
            )
    return A_ref


def averaged_b(
    updates: Sequence[ClientUpdate], name: str, weights: Tensor, dtype: torch.dtype, label: str
) -> LoraFactors:
    """``sum_k p_k pad(s_k B_k)`` against the shared frozen A of module ``name``: ``B_g @ A`` is the
    exact weighted sum because every client's A is the leading rows of that one A."""
    A = shared_a(updates, name, dtype, label)  # (r_max, n)
    Bs = [pad_cols(u.modules[name].effective(dtype)[0], A.shape[0]) for u in updates]
    B_g = (torch.stack(Bs) * weights.to(dtype)[:, None, None]).sum(0)  # (m, r_max)
    return LoraFactors(A=A, B=B_g)


@register("ffa")
@dataclass(frozen=True)
class FFALoRA(Aggregator):
    """FFA-LoRA aggregation: average B, keep the shared A.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.FROZEN_SHARED_A
    exact = True
    products_only = False
    label = "FFA-LoRA"

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        global_update = {
            name: averaged_b(updates, name, weights, self.dtype, self.label) for name in module_names(updates)
        }
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            per_client=per_client_slices(updates, global_update),
            energy_kept={name: 1.0 for name in global_update},
            sends_a=False,
        )
