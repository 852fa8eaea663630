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
class Householder:
    """An orthonormal basis ``Q: (m, q)``, ``q = min(m, R)``, kept as LAPACK's Householder reflectors
    (``torch.geqrf`` of an ``(m, R)`` matrix) and applied with ``torch.ormqr``, never formed.

    Forming Q (what ``torch.linalg.qr`` does after ``geqrf``) costs about as much as the
    factorisation itself; FLoRIST only needs Q times its ``p`` kept columns, which ``ormqr`` applies
    directly: on a (28672, 512) stack, geqrf + ormqr takes 0.7x the time of ``torch.linalg.qr`` alone.
    """

    reflectors: Tensor  # (m, R) as geqrf returns it: R above the diagonal, reflectors below
    tau: Tensor  # (min(m, R),)

    @property
    def shape(self) -> tuple[int, int]:
        m, R = self.reflectors.shape
        return int(m), int(min(m, R))

    def times(self, X: Tensor) -> Tensor:
        """``Q @ X`` for ``X: (q, p)``, an ``(m, p)`` tensor."""
        m, q = self.shape
        padded = X.new_zeros(m, X.shape[1])  # (m, p): Q is the first q columns of the full (m, m) Q
        padded[:q] = X
        return torch.ormqr(self.reflectors, self.tau, padded)


def householder_qr(M: Tensor) -> tuple[Householder, Tensor]:
    """``M (m, R) = Q R`` with ``Q`` in Householder form and ``R: (min(m, R), R)`` upper triangular."""
    reflectors, tau = torch.geqrf(M)
    q = min(M.shape)
    return Householder(reflectors, tau), torch.triu(reflectors[:q])


Basis_ = Tensor | Householder


def basis_times(basis: Basis_ | None, X: Tensor) -> Tensor:
    """``basis @ X`` for an explicit or Householder basis; ``X`` when there is none."""
    if basis is None:
        return X
    return basis.times(X) if isinstance(basis, Householder) else basis @ X


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
    left: Basis_ | None = None
    right: Basis_ | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrix this is the SVD of."""
        m = self.U.shape[0] if self.left is None else self.left.shape[0]
        n = self.Vh.shape[1] if self.right is None else self.right.shape[0]
        return int(m), int(n)

    def truncate(self, p: int) -> tuple[Tensor, Tensor]:
        """Best rank-``p`` factors (Eckart–Young): ``(U_p diag(S_p), Vh_p)``, ``(m, p)`` and ``(p, n)``."""
        return self.components(0, p)

    def components(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """The singular components ``lo`` to ``hi - 1`` as factors ``(U diag(S), Vh)`` of those columns
        and rows, ``(m, hi - lo)`` and ``(hi - lo, n)``: ``components(0, p)`` is ``truncate(p)``, and
        ``components(p, q)`` what the rank-``p`` cut leaves out."""
        B = basis_times(self.left, self.U[:, lo:hi] * self.S[lo:hi])  # (m, hi - lo)
        A = basis_times(self.right, self.Vh[lo:hi].mT).mT  # (hi - lo, n)
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
    ``R x R`` core between them); ``basis="qr"`` gets the same orthonormal bases from Householder
    QR factorisations kept in compact form (``Householder``), which is cheaper and gives the same
    product up to rounding: only the kept singular vectors are ever formed.
    """
    Qb: Basis_
    Qa: Basis_
    if basis == "qr":
        Qb, Rb = householder_qr(B)  # Q (m, q1) in Householder form, R (q1, R)
        Qa, Ra = householder_qr(A.mT)  # (n, q2), (q2, R)
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
