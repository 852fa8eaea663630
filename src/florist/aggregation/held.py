"""The global updates a merge-protocol client holds beside a quantized base, as one frozen adapter.

A 4-bit or 8-bit base cannot absorb ``W0 += B_g A_g`` exactly (dequantize, add, requantize loses the
update's small entries and drifts every round). Such a client keeps its base frozen as loaded and
holds what it would have merged as ``G``, a frozen low-rank adapter beside its trainable LoRA: the
model it trains is ``base + G + s B A``. Folding round t's global update U_t in:

    exact (no cap)   G_t = [B_G  B_U] [A_G; A_U]              rank grows by rank(U_t) each round
    capped           G_t = best rank-p approximation of that   p = min(max_rank, smallest rank
                     (factored SVD in float64, no m x n matrix)     holding tau of the energy)

Clients and the server fold the same updates in the same order with the same float64 CPU code, so
they hold the same ``G`` bit for bit and its ``digest`` is what the sync check compares. ``compress``
is also ``florist export``'s rank cap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from florist.aggregation.linalg import factored_svd
from florist.aggregation.rank_policy import rank_for_energy
from florist.errors import ConfigError
from florist.lora import LoraFactors

Modules = Mapping[str, LoraFactors]


def compress(f: LoraFactors, max_rank: int | None, tau: float | None) -> tuple[LoraFactors, float]:
    """Best rank-p factors of ``scaling * B @ A`` (float32, ``U_p S_p`` and ``V_p^T``) and the energy
    fraction they keep, ``p = min(max_rank, the smallest rank holding tau)`` (float64 SVD)."""
    B, A = f.effective(torch.float64)  # (m, r), (r, n)
    svd = factored_svd(B, A)
    p = int(svd.S.numel()) if tau is None else rank_for_energy(svd.S, tau)
    p = max(1, min(p, max_rank or p))
    B_p, A_p = svd.truncate(p)  # (m, p), (p, n)
    energy = svd.S.square()
    kept = float(energy[:p].sum() / energy.sum()) if float(energy.sum()) > 0 else 1.0
    return LoraFactors(A=A_p.float().contiguous(), B=B_p.float().contiguous()), kept


@dataclass
class HeldUpdates:
    """``G``: the sum of the global updates folded so far, per module, as effective float32 factors
    (scaling 1) on the CPU, re-compressed after each fold when ``max_rank`` or ``tau < 1`` caps it.

    Parameters
    ----------
    max_rank : int | None
        Keep at most this rank per module (``model.global_adapter_max_rank``); None: no rank cap.
    tau : float
        Keep the smallest rank holding this fraction of each module's energy
        (``model.global_adapter_tau``); 1.0: all of it.
    """

    max_rank: int | None = None
    tau: float = 1.0
    modules: dict[str, LoraFactors] = field(default_factory=dict)
    energy_kept: dict[str, float] = field(default_factory=dict)  # by the last fold's cap, per module

    @property
    def capped(self) -> bool:
        return self.max_rank is not None or self.tau < 1.0

    def fold(self, update: Modules) -> None:
        """``G += U`` (then re-compressed under the cap), in module-name order."""
        self.add(update)
        if self.capped:
            tau = None if self.tau >= 1.0 else self.tau
            for name in sorted(self.modules):
                self.modules[name], self.energy_kept[name] = compress(self.modules[name], self.max_rank, tau)

    def add(self, update: Modules) -> None:
        """``G += U`` exactly (factors side by side; no cap): a fold's first half, and a warm split."""
        if self.modules and set(update) != set(self.modules):
            missing, extra = sorted(set(self.modules) - set(update)), sorted(set(update) - set(self.modules))
            raise ConfigError(
                f"update does not match the held adapter: missing {missing[:3]}, extra {extra[:3]}"
            )
        for name in sorted(update):
            B_u, A_u = update[name].effective()  # float32 CPU, scaling folded
            B_u, A_u = B_u.cpu(), A_u.cpu()
            held = self.modules.get(name)
            if held is None:
                self.modules[name] = LoraFactors(A=A_u.contiguous(), B=B_u.contiguous())
            else:
                self.modules[name] = LoraFactors(
                    A=torch.cat([held.A, A_u]), B=torch.cat([held.B, B_u], dim=1)
                )

    def copy(self) -> HeldUpdates:
        """An independent copy (factors are never changed in place, so sharing them is safe)."""
        return HeldUpdates(self.max_rank, self.tau, dict(self.modules), dict(self.energy_kept))

    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.modules.items()}

    def digest(self, names: list[str]) -> str:
        """sha256 of the named modules' held factors in order (what a sync compares, as a merged
        base's weights are compared without a quantized base)."""
        h = hashlib.sha256()
        for name in names:
            h.update(name.encode())
            f = self.modules.get(name)
            if f is not None:
                h.update(f.B.contiguous().numpy().tobytes())
                h.update(f.A.contiguous().numpy().tobytes())
        return h.hexdigest()
