"""Checks on client updates before aggregation. Every failure names client, module and value."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from florist.errors import ConfigError, InvalidUpdate
from florist.lora.update import ClientUpdate, LoraFactors

MAX_PRODUCT = 1e30  # float32 overflows at 3.4e38; leave room for sums over clients and ranks
MAX_FACTOR = 1e4  # max |entry| of A and of s B: LoRA factors of a model whose weights are O(1)


def validate_updates(
    updates: Sequence[ClientUpdate], *, round: int | None = None, max_rank: int | None = None
) -> list[ClientUpdate]:
    """Validate a round's updates and return them sorted by client id.

    Raises ``ConfigError`` for an empty list and ``InvalidUpdate`` for duplicate ids, a bad
    example count, differing module sets, inconsistent shapes, a rank above ``max_rank``,
    or non-finite values.
    """
    if not updates:
        raise ConfigError("no client updates to aggregate: the client list is empty")
    counts = Counter(u.client_id for u in updates)
    for cid, count in counts.items():
        if count > 1:
            raise InvalidUpdate(cid, f"duplicate client id: it appears {count} times", round=round)
    ordered = sorted(updates, key=lambda u: u.client_id)
    modules, shapes = _majority(ordered)
    for update in ordered:
        _check_weight(update, round)
        _check_module_set(update, modules, round)
        for name, factors in update.modules.items():
            _check_factors(update.client_id, name, factors, round, max_rank)
            _check_shape_matches(update, name, shapes[name], round)
    return ordered


def check_update(
    update: ClientUpdate,
    expected: Mapping[str, tuple[int, int]],
    *,
    round: int | None = None,
    max_rank: int | None = None,
    max_examples: float | None = None,
) -> None:
    """One client's update against what the server expects, on its own (no other client needed).

    ``expected`` maps every adapted module to its weight shape ``(m, n)``. Raises ``InvalidUpdate``
    naming client, round and module for: a bad or inflated example count (above ``max_examples``,
    the count the client declared when it joined), missing or extra modules, wrong shapes, a rank
    above ``max_rank``, non-finite values.
    """
    _check_weight(update, round)
    if max_examples is not None and update.num_examples > max_examples:
        raise InvalidUpdate(
            update.client_id,
            f"num_examples {update.num_examples:g} exceeds the {max_examples:g} it declared when it joined",
            round=round,
        )
    missing, extra = sorted(set(expected) - set(update.modules)), sorted(set(update.modules) - set(expected))
    if missing or extra:
        raise InvalidUpdate(
            update.client_id,
            f"module set differs: missing {_short(missing)}, extra {_short(extra)}",
            round=round,
        )
    for name, factors in sorted(update.modules.items()):
        _check_factors(update.client_id, name, factors, round, max_rank)
        if factors.shape != tuple(expected[name]):
            raise InvalidUpdate(
                update.client_id,
                f"adapted weight shape {factors.shape} differs from the model's {tuple(expected[name])}",
                module=name,
                round=round,
            )


def client_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """``p_k = n_k / sum(n)`` in float64, in the order given (scaled by max(n) first: no overflow)."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    n = n / n.max()
    return n / n.sum()


def _majority(updates: Sequence[ClientUpdate]) -> tuple[frozenset[str], dict[str, tuple[int, int]]]:
    """The module set and per-module shapes most clients agree on (ties: the first in id order).

    A client that differs is blamed, not whichever client happens to sort first.
    """
    sets = Counter(frozenset(u.modules) for u in updates)
    modules = max(sets, key=lambda m: (sets[m], -_first_index(updates, m)))
    shapes = {}
    for name in modules:
        seen = [_shape(u.modules[name]) for u in updates if name in u.modules]
        counts = Counter(s for s in seen if s is not None)
        if counts:  # no client has a well-formed pair: _check_factors names each one
            shapes[name] = max(counts, key=lambda s: (counts[s], -seen.index(s)))
    return modules, shapes


def _shape(f: LoraFactors) -> tuple[int, int] | None:
    return (f.B.shape[0], f.A.shape[1]) if f.A.ndim == 2 and f.B.ndim == 2 else None


def _first_index(updates: Sequence[ClientUpdate], modules: frozenset[str]) -> int:
    return next(i for i, u in enumerate(updates) if frozenset(u.modules) == modules)


def _check_weight(update: ClientUpdate, round: int | None) -> None:
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise InvalidUpdate(
            update.client_id, f"num_examples must be a positive finite number, got {n!r}", round=round
        )
    if not update.modules:
        raise InvalidUpdate(update.client_id, "the update has no adapted modules", round=round)


def _check_module_set(update: ClientUpdate, want: frozenset[str], round: int | None) -> None:
    have = set(update.modules)
    if have == want:
        return
    missing, extra = sorted(want - have), sorted(have - want)
    raise InvalidUpdate(
        update.client_id,
        f"module set differs from the other clients': missing {_short(missing)}, extra {_short(extra)}",
        round=round,
    )


def _check_factors(cid: str, name: str, f: LoraFactors, round: int | None, max_rank: int | None) -> None:
    def fail(reason: str) -> InvalidUpdate:
        return InvalidUpdate(cid, reason, module=name, round=round)

    if f.A.ndim != 2 or f.B.ndim != 2:
        raise fail(f"lora_A and lora_B must be 2-D, got shapes {tuple(f.A.shape)} and {tuple(f.B.shape)}")
    if f.B.shape[1] != f.A.shape[0]:
        raise fail(
            f"lora_B shape {tuple(f.B.shape)} does not match lora_A shape {tuple(f.A.shape)}: "
            f"B must be (m, r) and A (r, n) with the same r"
        )
    if f.rank < 1:
        raise fail(f"rank must be at least 1, got {f.rank}")
    if max_rank is not None and f.rank > max_rank:
        raise fail(f"rank {f.rank} exceeds the allowed maximum {max_rank}")
    if not math.isfinite(f.scaling):
        raise fail(f"scaling must be finite, got {f.scaling!r}")
    if f.core is not None and (f.core.ndim != 2 or tuple(f.core.shape) != (f.rank, f.rank)):
        raise fail(f"the core must be ({f.rank}, {f.rank}) between B and A, got {tuple(f.core.shape)}")
    for label, t in (("lora_A", f.A), ("lora_B", f.B), ("core", f.core)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise fail(f"{label} must be a floating-point tensor, got dtype {t.dtype}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            nans = int(torch.isnan(t).sum())
            raise fail(f"{label} has {bad} non-finite values ({nans} NaN, {bad - nans} Inf)")
    _check_magnitude(f if f.core is None else f.folded(), fail)


def _check_magnitude(f: LoraFactors, fail: Callable[[str], InvalidUpdate]) -> None:
    """Each effective factor (``s B``, ``A``) on its own, and any product of them, stays in range.

    Each factor's entries must stay below ``MAX_FACTOR``: a product bound alone passes ``B = 0`` (or
    B's that cancel) with an A of 1e38, which methods that average or stack the factors themselves
    (FedIT, FLoRA's download, FedEx-LoRA) hand on to every client. Scaling and tensors are finite on
    their own yet ``s B`` can overflow (a scaling of 1e300), and so can the aggregators' products of
    stacks; ``max|s B| max|A| r max(m, n)`` bounds every entry of ``s B A`` and of the cores the
    aggregators form, and must stay below ``MAX_PRODUCT``.
    """
    b_max = float(f.B.abs().max()) * abs(f.scaling) if f.B.numel() else 0.0
    a_max = float(f.A.abs().max()) if f.A.numel() else 0.0
    for label, value in (("scaling * B", b_max), ("A", a_max)):
        if not (math.isfinite(value) and value <= MAX_FACTOR):
            raise fail(f"factor out of range: max|{label}| = {value:.3g} exceeds {MAX_FACTOR:.0e}")
    bound = b_max * a_max * f.rank * max(f.shape)
    if not (math.isfinite(bound) and bound < MAX_PRODUCT):
        raise fail(
            f"update magnitude out of range: max|scaling * B| = {b_max:.3g}, max|A| = {a_max:.3g} "
            f"(their products would exceed {MAX_PRODUCT:.0e} and overflow float32 aggregation)"
        )


def _check_shape_matches(update: ClientUpdate, name: str, want: tuple[int, int], round: int | None) -> None:
    got = update.modules[name].shape
    if got != want:
        raise InvalidUpdate(
            update.client_id,
            f"adapted weight shape {got} differs from the other clients' {want}",
            module=name,
            round=round,
        )


def _short(names: list[str], limit: int = 4) -> str:
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} and {len(names) - limit} more"
