"""The one type for a LoRA update.

A LoRA adapter on a linear layer ``W0: (m, n)`` computes ``x -> W0 x + s * B A x`` with
``A: (r, n)``, ``B: (m, r)`` and scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
``LoraFactors`` keeps the three apart and says so; aggregators only ever see *effective*
factors, ``(s * B, A)``, so a scaling is never applied twice or forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling rule: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraFactors:
    """LoRA factors of one adapted matrix: ``delta W = scaling * B @ A``, or, with a ``core``,
    ``scaling * B @ core @ A`` (Fed-SB: B and A a frozen basis both sides hold, only the r x r core
    trains and travels). ``effective`` folds the core into B, so code that reads products never sees it.

    Attributes
    ----------
    A : Tensor
        ``(r, n)`` down-projection.
    B : Tensor
        ``(m, r)`` up-projection.
    scaling : float
        Factor applied to ``B @ A`` (PEFT's ``alpha / r``); 1.0 for effective factors.
    core : Tensor | None
        ``(r, r)`` between B and A, or None.
    """

    A: Tensor  # (r, n)
    B: Tensor  # (m, r)
    scaling: float = 1.0
    core: Tensor | None = None  # (r, r)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the shape of the adapted weight."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def effective(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(scaling * B [@ core], A)`` in ``dtype``: the factors aggregators work on."""
        B = self.B.to(dtype) if self.core is None else self.B.to(dtype) @ self.core.to(dtype)
        return B * self.scaling, self.A.to(dtype)  # (m, r), (r, n)

    def folded(self) -> LoraFactors:
        """The same product as plain effective factors (no core, scaling 1) in B's dtype."""
        if self.core is None and self.scaling == 1.0:
            return self
        B, A = self.effective(self.B.dtype)
        return LoraFactors(A=A, B=B)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor it holds: A, B and the core if any."""
        return (self.A, self.B) if self.core is None else (self.A, self.B, self.core)

    def leading(self, r: int, *, pad: bool = False) -> LoraFactors:
        """The leading ``r`` components as effective factors (scaling folded into B, in B's dtype),
        copied; with ``pad``, zero-padded to rank ``r`` when there are fewer. The one "leading r" slice:
        a continue client's share of a global update, FedEx-LoRA's continuation, per-client slices."""
        B, A = self.effective(self.B.dtype)  # (m, p), (p, n)
        if A.shape[0] >= r or not pad:
            return LoraFactors(A=A[:r].clone(), B=B[:, :r].clone())
        extra = r - A.shape[0]
        return LoraFactors(
            A=torch.cat([A, A.new_zeros(extra, A.shape[1])]),
            B=torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1),
        )

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``scaling * B @ A``, ``(m, n)``. For tests and small matrices only."""
        B, A = self.effective(dtype)
        return B @ A


@dataclass(frozen=True)
class ClientUpdate:
    """One client's LoRA update for one round.

    Attributes
    ----------
    client_id : str
        Unique id; clients are sorted by it before stacking, so arrival order never matters.
    num_examples : float
        ``n_k``; the aggregation weight is ``p_k = n_k / sum(n)``.
    modules : Mapping[str, LoraFactors]
        Adapted module name (``model.layers.0.self_attn.q_proj``) to its factors.
    start : Mapping[str, LoraFactors] | None
        The adapter the client's LoRA began the round from, when it did not begin at ``B = 0``
        and the aggregator needs the factors as trained (FedEx-LoRA); set by the server, never sent.
        The round's change is then ``s B A - B_start A_start`` (``change``).
    noise_std : float | None
        Client-level DP (``florist.privacy.client_level``): the per-entry std of the Gaussian noise in
        this update, the noised mean of the round's changes; set by the server, never sent.
    lora_rank : int | None
        The rank of the client's LoRA, set by the server from the client's config, never sent; the
        factors' own rank when None. It differs when the client cut its upload (uplink thresholding),
        and tells a per-client download (FlexLoRA) what rank the client's LoRA can load.
    """

    client_id: str
    num_examples: float
    modules: Mapping[str, LoraFactors] = field(default_factory=dict)
    start: Mapping[str, LoraFactors] | None = None
    lora_rank: int | None = None
    noise_std: float | None = None

    def rank_of(self, name: str) -> int:
        """The rank of the client's LoRA on module ``name``: ``lora_rank`` if set, else the factors'."""
        return self.lora_rank if self.lora_rank is not None else self.modules[name].rank

    @property
    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.modules.items()}

    def change(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``(m, n)`` change of module ``name`` this round: ``s B A``, less the start if any."""
        delta = self.modules[name].delta(dtype)
        return delta if self.start is None else delta - self.start[name].delta(dtype)


def add_update(weight: Tensor, factors: LoraFactors) -> None:
    """``W += scaling * B @ A`` in W's dtype and on W's device, in place: the one merge clients and
    server both use (updates travel and aggregate on the CPU; the model may sit on a GPU)."""
    weight.add_(factors.delta(torch.float32).to(weight.device, weight.dtype))


def sum_of_rounds(history: Sequence[Mapping[str, LoraFactors]]) -> dict[str, LoraFactors]:
    """The sum of several updates as one adapter: their effective factors side by side.

    B = [B_1 ... B_T]  (m, sum p_t),  A = [A_1; ...; A_T]  (sum p_t, n),  B @ A = sum_t B_t A_t
    """
    out = {}
    for name in history[-1]:
        parts = [h[name].effective() for h in history]  # (B_t (m, p_t), A_t (p_t, n))
        out[name] = LoraFactors(A=torch.cat([A for _, A in parts]), B=torch.cat([B for B, _ in parts], dim=1))
    return out
