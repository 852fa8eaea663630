"""Seeds derived from named parts, stable across processes and machines (no Python ``hash``).

derive_seed(run_seed, "client-003", round, "train")   -> a 63-bit int for torch.Generator
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (client id, round, module name, ...): sha256 of their ``:``-join."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
