"""Synthetic client adapters with realistic structure, for the demo and benchmarks.

Each client's update on a module is a shared low-rank "task" component (the same directions for
every client, with client-specific strengths) plus directions of its own with a decaying
spectrum, sized relative to the base weight as measured after real LoRA fine-tuning of
SmolLM2-135M (||delta W|| / ||W|| ~ 3e-3). Deeper layers and v_proj get somewhat larger updates,
so ranks chosen per module differ as they do on trained adapters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from florist.lora import LoraFactors

SHARED_RANK = 4
RELATIVE_NORM = 3e-3


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q: torch.Tensor = torch.linalg.qr(torch.randn(rows, cols, generator=g)).Q
    return q  # (rows, cols)


def module_diversity(name: str, depth: float) -> float:
    """Weight of client-specific directions against the shared ones: grows with depth, most on v_proj."""
    kind = name.rsplit(".", 1)[-1]
    return (0.1 + 0.7 * depth) * {"v_proj": 1.5, "o_proj": 1.2, "k_proj": 0.7}.get(kind, 1.0)


def client_factors(
    weight_norm: float,
    shape: tuple[int, int],
    rank: int,
    alpha: float,
    diversity: float,
    shared: tuple[torch.Tensor, torch.Tensor],
    g: torch.Generator,
) -> LoraFactors:
    """One client's PEFT factors ``(A, B)`` with scaling ``alpha / rank`` for a module of ``shape``."""
    m, n = shape
    U0, V0 = shared  # (m, SHARED_RANK), (n, SHARED_RANK)
    c = min(SHARED_RANK, rank)
    s_shared = torch.tensor([1.0, 0.6, 0.4, 0.25])[:c] * (1 + 0.3 * torch.randn(c, generator=g)).abs()
    s_own = diversity * 0.85 ** torch.arange(rank - c, dtype=torch.float32)
    U = torch.cat([U0[:, :c], _orthonormal(m, rank - c, g)], dim=1)  # (m, r)
    V = torch.cat([V0[:, :c], _orthonormal(n, rank - c, g)], dim=1)  # (n, r)
    s = torch.cat([s_shared, s_own])
    s = s * (RELATIVE_NORM * weight_norm / s.norm())
    scaling = alpha / rank
    return LoraFactors(A=V.T.contiguous(), B=(U * s / scaling).contiguous(), scaling=scaling)


def synthetic_clients(
    weights: Mapping[str, torch.Tensor], ranks: list[int], seed: int = 0
) -> list[dict[str, LoraFactors]]:
    """Per client, ``{module: LoraFactors}`` for every module in ``weights`` (name -> base weight)."""
    g = torch.Generator().manual_seed(seed)
    layers = sorted({_layer(n) for n in weights})
    clients: list[dict[str, LoraFactors]] = [{} for _ in ranks]
    for name, W in sorted(weights.items()):
        m, n = W.shape
        shared = (_orthonormal(m, SHARED_RANK, g), _orthonormal(n, SHARED_RANK, g))
        depth = layers.index(_layer(name)) / max(1, len(layers) - 1)
        diversity = module_diversity(name, depth)
        for k, r in enumerate(ranks):
            clients[k][name] = client_factors(float(W.norm()), (m, n), r, 2.0 * r, diversity, shared, g)
    return clients


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else 0
