"""Seeded LoRA initialisation that the server can reproduce without the model.

    A ~ U(-1/sqrt(n), 1/sqrt(n))  drawn as (rows, n) from a seed that depends on (seed, module name)

FFA-LoRA clients freeze the leading ``r_k`` rows of one ``(r_max, n)`` draw, so every client holds
the same A and uploads only B; the server rebuilds A from the same seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from florist.seeds import derive_seed


def seeded_a(seed: int, name: str, rows: int, n: int) -> Tensor:
    """The ``(rows, n)`` float32 draw of module ``name``; its leading rows are any smaller rank's A."""
    g = torch.Generator().manual_seed(derive_seed(seed, name))  # 63 bits from (run seed, module)
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(rows, n, generator=g) * 2 - 1) * bound  # (rows, n)
