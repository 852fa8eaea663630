"""Shared linear algebra: stacking client factors and the exact SVD of a product from its factors.

With K clients, effective factors ``B_k: (m, r_k)``, ``A_k: (r_k, n)`` and weights ``p_k``:

    B_stack = [B_1 ... B_K]            (m, R),  R = sum_k r_k
    A_stack = [p_1 A_1; ...; p_K A_K]  (R, n)
    B_stack @ A_stack == sum_k p_k B_k A_k        (exact)

``factored_svd`` returns the thin SVD of ``B @ A`` without ever forming the ``(m, n)`` product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from florist.lora.update import ClientUpdate, LoraFactors

Basis = Literal["qr", "svd"]


@dataclass(frozen=True)
class ThinSVD:
    """``U @ diag(S) @ Vh`` with ``S: (q,)`` descending, kept in factored form.

    The full left singular vectors are ``left @ U`` (``(m, q1) @ (q1, q)``) and the right ones
    ``Vh @ right.T`` (``(q, q2) @ (q2, n)``); ``left`` / ``right`` are ``None`` when ``U`` / ``Vh``
    already are the full ones. Only the kept columns are ever multiplied out (``truncate``).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    left: Tensor | None = None
    right: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrix this is the SVD of."""
        m = self.U.shape[0] if self.left is None else self.left.shape[0]
        n = self.Vh.shape[1] if self.right is None else self.right.shape[0]
        return int(m), int(n)

    def truncate(self, p: int) -> tuple[Tensor, Tensor]:
        """Best rank-``p`` factors (Eckart–Young): ``(U_p diag(S_p), Vh_p)``, ``(m, p)`` and ``(p, n)``."""
        B = self.U[:, :p] * self.S[:p]  # (q1 or m, p)
        A = self.Vh[:p]  # (p, q2 or n)
        if self.left is not None:
            B = self.left @ B  # (m, p)
        if self.right is not None:
            A = A @ self.right.mT  # (p, n)
        return B, A


def stack_module(
    updates: Sequence[ClientUpdate], weights: Tensor, module: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(B_stack, A_stack)`` of one module, ``(m, R)`` and ``(R, n)``, weights folded into A."""
    Bs, As = [], []
    for update, p in zip(updates, weights.tolist(), strict=True):
        B, A = update.modules[module].effective(dtype)  # (m, r_k), (r_k, n)
        Bs.append(B)
        As.append(A * p)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def factored_svd(B: Tensor, A: Tensor, basis: Basis = "qr") -> ThinSVD:
    """Exact thin SVD of ``B @ A`` from ``B: (m, R)`` and ``A: (R, n)`` in O((m + n) R^2).

    ``basis="svd"`` is the paper's pipeline (thin SVDs of both factors, then the SVD of the
    ``R x R`` core between them); ``basis="qr"`` gets the same orthonormal bases from QR
    factorisations, which is cheaper and gives the same product up to rounding.
    """
    if basis == "qr":
        Qb, Rb = torch.linalg.qr(B)  # (m, q1), (q1, R)
        Qa, Ra = torch.linalg.qr(A.mT)  # (n, q2), (q2, R)
        core = Rb @ Ra.mT  # (q1, q2):  B @ A == Qb @ core @ Qa.T
    elif basis == "svd":
        Ub, Sb, Vbh = torch.linalg.svd(B, full_matrices=False)  # (m, q1), (q1,), (q1, R)
        Qa, Sa, Uah = torch.linalg.svd(A.mT, full_matrices=False)  # (n, q2), (q2,), (q2, R): tall is faster
        Qb = Ub
        core = (Sb[:, None] * Vbh) @ (Uah.mT * Sa)  # (q1, q2)
    else:
        raise ValueError(f"basis must be 'qr' or 'svd', got {basis!r}")
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)  # (q1, q), (q,), (q, q2)
    return ThinSVD(U=Uc, S=S, Vh=Vch, left=Qb, right=Qa)


def dense_svd(delta: Tensor) -> ThinSVD:
    """Thin SVD of a dense ``(m, n)`` matrix (the FlexLoRA / reference path)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return ThinSVD(U=U, S=S, Vh=Vh)


def energy_fraction(S: Tensor) -> Tensor:
    """Cumulative fraction of ``sum(S^2)`` held by the first 1, 2, ... values, in float64.

    An all-zero spectrum holds "all" of its (zero) energy at every rank: the result is ones.
    """
    energy = S.to(torch.float64).square().cumsum(0)
    total = energy[-1] if energy.numel() else torch.tensor(0.0, dtype=torch.float64)
    if float(total) == 0.0:
        return torch.ones_like(energy)
    return energy / total


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """Zero-pad ``(r, n)`` to ``(rows, n)``."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])], dim=0)


def pad_cols(t: Tensor, cols: int) -> Tensor:
    """Zero-pad ``(m, r)`` to ``(m, cols)``."""
    return torch.cat([t, t.new_zeros(t.shape[0], cols - t.shape[1])], dim=1)


def energy_beyond(updates: Mapping[str, LoraFactors], rank: int) -> float:
    """Share of the energy ``sum_i S_i^2`` of ``updates`` (all modules together) in the singular
    directions after the leading ``rank`` of each module: raFLoRA's "rank collapse" measure with
    ``rank`` the smallest client rank (energy piling into the ranks every client has drives it to 0)."""
    tail = total = 0.0
    for f in updates.values():
        B, A = f.effective(torch.float64)  # (m, p), (p, n)
        energy = factored_svd(B, A).S.square()
        tail, total = tail + float(energy[rank:].sum()), total + float(energy.sum())
    return tail / total if total else 0.0
