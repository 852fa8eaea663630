"""Shared fixtures: fabricated client updates and a dense reference to check aggregators against."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from florist.lora import ClientUpdate, LoraFactors

# ../shared/data beside the repository (as CI lays it out), or $FLORIST_SHARED_DATA
SHARED_DATA = Path(
    os.environ.get("FLORIST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

SHAPES = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16), "layers.1.q_proj": (24, 16)}


def make_updates(
    ranks: Sequence[int],
    *,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    seed: int = 0,
    sizes: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    shared_a: bool = False,
    decay: dict[str, float] | None = None,
) -> list[ClientUpdate]:
    """Clients with random factors, rank ``ranks[k]``, alpha = 2 r_k, distinct example counts.

    ``decay[module]`` multiplies column i of B by decay**i, so spectra differ between modules.
    ``shared_a`` gives every client the leading rows of one seeded A (FFA-LoRA's setting).
    """
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [10.0 * (k + 1) + k * k for k in range(len(ranks))]
    r_max = max(ranks)
    common = {name: torch.randn(r_max, n, generator=g) for name, (m, n) in shapes.items()}
    updates = []
    for k, (r, size) in enumerate(zip(ranks, sizes, strict=True)):
        modules = {}
        for name, (m, n) in shapes.items():
            A = common[name][:r].clone() if shared_a else torch.randn(r, n, generator=g)
            B = torch.randn(m, r, generator=g)
            if decay and name in decay:
                B = B * decay[name] ** torch.arange(r, dtype=torch.float32)
            modules[name] = LoraFactors(A=A.to(dtype), B=B.to(dtype), scaling=2.0)
        updates.append(ClientUpdate(client_id=f"client-{k}", num_examples=size, modules=modules))
    return updates


def dense_reference(updates: Sequence[ClientUpdate], module: str) -> torch.Tensor:
    """``sum_k p_k scaling_k B_k A_k`` in float64, formed densely."""
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * u.modules[module].delta(torch.float64) for u in updates)


def best_rank_p(delta: torch.Tensor, p: int) -> torch.Tensor:
    """Eckart–Young: the best rank-``p`` approximation of ``delta`` by a dense SVD."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :p] @ torch.diag(S[:p]) @ Vh[:p]


def assert_product_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Compare products with a relative tolerance and an absolute floor scaled to the matrix."""
    atol = rtol * float(want.abs().max())
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=rtol, atol=atol)
