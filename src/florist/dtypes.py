"""The one table of dtype names florist accepts (config keys, CLI flags, the wire), and their sizes.

torch_dtype("bfloat16", "federation.wire_dtype", WIRE)   # torch.bfloat16, or ConfigError naming the key
itemsize("float16")                                      # 2
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from florist.errors import ConfigError

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
WIRE = ("float32", "bfloat16", "float16")  # what Flower messages carry (float64 only in byte counts)
MODEL = ("float32", "bfloat16", "float16")  # base-model weights
COMPUTE = ("float32", "float64")  # aggregation


def torch_dtype(name: str, what: str, allowed: Collection[str] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype called ``name``, if ``allowed``; else ``ConfigError`` naming ``what``."""
    if name not in allowed:
        raise ConfigError(f"{what} must be one of {sorted(allowed)}, got {name!r}")
    return DTYPES[name]


def itemsize(name: str, what: str = "wire dtype") -> int:
    """Bytes per element of the dtype called ``name``."""
    return torch_dtype(name, what).itemsize
