"""Split examples over clients: IID, or Dirichlet(alpha) over a label column (non-IID, unbalanced).

Both are deterministic in ``seed`` and guarantee every client at least ``min_partition_size``
examples (the Dirichlet draw is repeated with the next seed until it does, as flwr-datasets does).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from florist.errors import ConfigError

T = TypeVar("T")
MAX_TRIES = 100


def iid_partition(
    items: Sequence[T], num_clients: int, seed: int, min_partition_size: int = 1
) -> list[list[T]]:
    """Shuffle with ``seed`` and deal into ``num_clients`` near-equal parts."""
    _check(len(items), num_clients, min_partition_size)
    order = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in part] for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    items: Sequence[T],
    num_clients: int,
    alpha: float,
    label: Callable[[T], str],
    seed: int,
    min_partition_size: int = 1,
) -> list[list[T]]:
    """Per label, split its examples over clients with proportions drawn from Dirichlet(alpha)."""
    _check(len(items), num_clients, min_partition_size)
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be positive, got {alpha}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_label[label(item)].append(i)
    for attempt in range(MAX_TRIES):
        parts = _draw(by_label, num_clients, alpha, np.random.default_rng(seed + attempt))
        if min(len(p) for p in parts) >= min_partition_size:
            return [[items[i] for i in sorted(p)] for p in parts]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split of {len(items)} examples over {num_clients} clients gave every "
        f"client {min_partition_size} examples in {MAX_TRIES} draws; raise alpha or lower min_partition_size"
    )


def label_partition(
    items: Sequence[T], num_clients: int, label_of: Callable[[T], str], column: str = "label"
) -> list[list[T]]:
    """A natural split: one client per distinct label (``column``'s values, sorted), all its rows."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(label_of(item), []).append(item)
    if len(groups) != num_clients:
        shown = sorted(groups)[:8]
        raise ConfigError(
            f"data.split = 'by_label' gives one client per value of {column!r}: {len(groups)} values "
            f"({shown}{' ...' if len(groups) > 8 else ''}) for federation.num_clients = {num_clients}"
        )
    return [groups[key] for key in sorted(groups)]


def _draw(by_label: dict[str, list[int]], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(k)]
    for name in sorted(by_label):
        idx = rng.permutation(by_label[name])
        cuts = (np.cumsum(rng.dirichlet([alpha] * k)) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return parts


def _check(n: int, num_clients: int, min_partition_size: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")
    if n < num_clients * min_partition_size:
        raise ConfigError(
            f"{n} examples cannot give {num_clients} clients {min_partition_size} examples each"
        )
