"""Norm clipping of client updates, computed in factored form (no m x n matrix is formed).

For one module, with effective factors B (m, r) and A (r, n):

    ||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)) = sum((B^T B) * (A A^T))   # (r, r) each

A client's update norm is the root of the sum over its modules. Clipping scales every B of the
client by ``min(1, c / norm)``, which scales each product B A and therefore the client's whole
update, for every method (FedIT's separate averages included). The threshold ``c`` is fixed
(``clip = "fixed"``) or ``clip_value`` times the median of the round's client norms
(``clip = "median"``), so one client cannot stretch it.

Methods that average the factors themselves (FedIT, RB-LoRA, FFA-LoRA's B) also have each factor
clipped on its own (``clip_factors``): a client with B = 0 has a product of norm 0, yet its A enters
the average of A, and the global ``avg(B) avg(A)`` with it. Each client's ``||A||`` (over its modules)
is clipped to ``clip_value`` times the median of the round's, and ``||s B||`` likewise.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from florist.errors import ConfigError
from florist.lora.update import ClientUpdate, LoraFactors

CLIP_MODES = ("none", "median", "fixed")


def factored_norm_sq(f: LoraFactors) -> float:
    """``||B A||_F^2`` from the two (r, r) Gram matrices, in float64."""
    B, A = f.effective(torch.float64)  # (m, r), (r, n)
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0))


def update_norm(update: ClientUpdate) -> float:
    """Frobenius norm of the client's whole update: sqrt(sum over modules of ||B A||_F^2)."""
    return float(sum(factored_norm_sq(f) for f in update.modules.values()) ** 0.5)


@dataclass(frozen=True)
class ClipReport:
    """Per-client norms before clipping, the threshold, and the factor each client was scaled by."""

    threshold: float
    norms: dict[str, float]
    factors: dict[str, float]

    @property
    def clipped(self) -> list[str]:
        return sorted(c for c, s in self.factors.items() if s < 1.0)


def clip_threshold(norms: Sequence[float], mode: str, value: float) -> float:
    """``value`` (fixed) or ``value * median(norms)`` (median)."""
    if mode not in CLIP_MODES or mode == "none":
        raise ConfigError(f"clip mode must be 'median' or 'fixed', got {mode!r}")
    if not value > 0:
        raise ConfigError(f"clip value must be > 0, got {value}")
    return value if mode == "fixed" else value * statistics.median(norms)


def clip_updates(
    updates: Sequence[ClientUpdate], mode: str, value: float
) -> tuple[list[ClientUpdate], ClipReport]:
    """Scale each update whose norm exceeds the threshold down to it; others are returned as they are."""
    norms = {u.client_id: update_norm(u) for u in updates}
    c = clip_threshold(list(norms.values()), mode, value)
    factors = {cid: (min(1.0, c / n) if n > 0 else 1.0) for cid, n in norms.items()}
    out = [scale_update(u, factors[u.client_id]) for u in updates]
    return out, ClipReport(c, norms, factors)


def clip_factors(updates: Sequence[ClientUpdate], value: float, with_a: bool = True) -> list[ClientUpdate]:
    """Each client's A and s B scaled down, separately, to ``value`` times the median of the round's
    factor norms (over all modules); ``with_a=False`` leaves A alone (FFA-LoRA's frozen shared A)."""
    out = list(updates)
    for side in ("B", "A") if with_a else ("B",):
        norms = [_factor_norm(u, side) for u in out]
        c = value * statistics.median(norms)
        out = [
            _scale_factor(u, side, min(1.0, c / n) if n > 0 else 1.0) for u, n in zip(out, norms, strict=True)
        ]
    return out


def _factor_norm(update: ClientUpdate, side: str) -> float:
    total = 0.0
    for f in update.modules.values():
        B, A = f.effective(torch.float64)
        total += float((B if side == "B" else A).square().sum())
    return float(total**0.5)


def _scale_factor(update: ClientUpdate, side: str, s: float) -> ClientUpdate:
    if s == 1.0:
        return update
    modules = {name: replace(f, **{side: getattr(f, side) * s}) for name, f in update.modules.items()}
    return replace(update, modules=modules)


def cap_weights(updates: Sequence[ClientUpdate], max_weight: float) -> list[ClientUpdate]:
    """``updates`` with no client's weight ``p_k = n_k / sum(n)`` above ``max_weight``.

    Water-filling: clients above the cap are held at it and the rest of the mass goes to the others
    in proportion to their ``n_k``, repeated until none is above; below ``1 / K`` the cap is
    ``1 / K`` (equal weights). The ``num_examples`` returned give those weights (their sum is kept).
    """
    total = sum(u.num_examples for u in updates)
    cap = max(max_weight, 1.0 / len(updates))
    fixed: set[str] = set()
    while True:
        free = [u for u in updates if u.client_id not in fixed]
        mass = 1.0 - cap * len(fixed)
        free_total = sum(u.num_examples for u in free)
        weights = {u.client_id: cap for u in updates if u.client_id in fixed}
        weights |= {u.client_id: mass * u.num_examples / free_total for u in free}
        over = {c for c, w in weights.items() if w > cap * (1 + 1e-12) and c not in fixed}
        if not over:
            break
        fixed |= over
    return [replace(u, num_examples=weights[u.client_id] * total) for u in updates]


def scale_update(update: ClientUpdate, s: float) -> ClientUpdate:
    """The update times ``s`` (B, or the core when there is one, scaled; A and the scaling untouched)."""
    if s == 1.0:
        return update
    modules = {
        name: replace(f, B=f.B * s) if f.core is None else replace(f, core=f.core * s)
        for name, f in update.modules.items()
    }
    return replace(update, modules=modules)
