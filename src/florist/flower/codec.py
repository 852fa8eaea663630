"""LoRA factors <-> Flower records, and the bytes they put on the wire.

Upload (client -> server), one ``ArrayRecord`` under ``"lora"``:
    "{module}.lora_A" (r_k, n), "{module}.lora_B" (m, r_k)   raw factors
    and a ``ConfigRecord`` "lora_meta" with the scaling and, when A is not sent (FFA-LoRA), n.
Download (server -> client), one ``ArrayRecord`` per global update under ``"global.{round}"``:
    effective factors (scaling 1.0); B only for FFA-LoRA.
Factors with a core (Fed-SB): "{module}.lora_R" (r, r) alone, up and down; a download also carries
    the basis "{module}.lora_A", "{module}.lora_B" to a node that does not hold it yet.

Arrays travel in the wire dtype (``federation.wire_dtype``): float32, float16, or bfloat16, which
NumPy lacks and which is sent as its raw 16-bit pattern (a uint16 array) under the dtype name
"bfloat16". Whatever arrives is decoded to float32; the server aggregates in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from florist.dtypes import WIRE, itemsize
from florist.errors import InvalidUpdate
from florist.lora import LoraFactors

A_SUFFIX, B_SUFFIX, R_SUFFIX = ".lora_A", ".lora_B", ".lora_R"


BF16 = "bfloat16"


def _array(t: torch.Tensor, wire: str = "float32") -> Array:
    """``t`` as an ``Array`` of dtype ``wire``."""
    if wire not in WIRE:
        raise ValueError(f"wire dtype must be one of {sorted(WIRE)}, got {wire!r}")
    t = t.detach().cpu().contiguous()
    if wire == BF16:
        bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        raw = Array(bits)
        return Array(dtype=BF16, shape=tuple(t.shape), stype=raw.stype, data=raw.data)
    return Array(t.to(getattr(torch, wire)).numpy())


def _tensor(a: Array) -> torch.Tensor:
    """An arrived ``Array`` as float32; only the wire dtypes are accepted."""
    if a.dtype not in WIRE:
        raise ValueError(f"array dtype {a.dtype!r} is not a wire dtype ({sorted(WIRE)})")
    values = a.numpy()
    if tuple(values.shape) != tuple(a.shape):
        raise ValueError(f"array claims shape {tuple(a.shape)} but holds {tuple(values.shape)}")
    if a.dtype == BF16:
        if values.dtype != np.uint16:
            raise ValueError(f"a bfloat16 array must carry uint16 bits, got {values.dtype}")
        bits = torch.from_numpy(np.ascontiguousarray(values).view(np.int16).copy())
        return bits.view(torch.bfloat16).float()
    if str(values.dtype) != a.dtype:
        raise ValueError(f"array claims dtype {a.dtype} but holds {values.dtype}")
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))


def encode_factors(
    modules: Mapping[str, LoraFactors], *, with_a: bool = True, wire: str = "float32", with_basis: bool = True
) -> ArrayRecord:
    """Factors as an ``ArrayRecord`` in dtype ``wire``, sorted by module; A left out unless ``with_a``.
    Factors with a core: the effective core, and the basis (B, A) only ``with_basis``."""
    arrays: dict[str, Array] = {}
    for name, f in sorted(modules.items()):
        if f.core is not None:
            arrays[name + R_SUFFIX] = _array(f.core * f.scaling, wire)
            if with_basis:
                arrays[name + A_SUFFIX], arrays[name + B_SUFFIX] = _array(f.A, wire), _array(f.B, wire)
            continue
        if with_a:
            arrays[name + A_SUFFIX] = _array(f.A, wire)
        arrays[name + B_SUFFIX] = _array(f.B, wire)
    return ArrayRecord(array_dict=arrays)


def encode_upload(
    modules: Mapping[str, LoraFactors], *, with_a: bool = True, wire: str = "float32"
) -> tuple[ArrayRecord, ConfigRecord]:
    """A client's raw factors and their scaling (and A's width when A stays home); a core alone, its
    scaling folded in, when the factors have one (the server holds the basis)."""
    meta: dict[str, Any] = {}
    for name, f in sorted(modules.items()):
        meta[f"scaling.{name}"] = 1.0 if f.core is not None else float(f.scaling)
        if not with_a:
            meta[f"n.{name}"] = int(f.A.shape[1])
    return encode_factors(modules, with_a=with_a, wire=wire, with_basis=False), ConfigRecord(meta)


def decode_cores(
    record: ArrayRecord, client: str, basis: Mapping[str, LoraFactors] | None = None
) -> dict[str, LoraFactors]:
    """Cores on a basis: the record's own ("lora_A", "lora_B" beside "lora_R") or ``basis``'s."""
    cores: dict[str, torch.Tensor] = {}
    own: dict[str, dict[str, torch.Tensor]] = {}
    for key, arr in record.items():
        for suffix in (R_SUFFIX, A_SUFFIX, B_SUFFIX):
            if key.endswith(suffix):
                name = key.removesuffix(suffix)
                if suffix == R_SUFFIX:
                    cores[name] = _tensor(arr)
                else:
                    own.setdefault(name, {})[suffix] = _tensor(arr)
                break
        else:
            raise InvalidUpdate(client, f"unexpected array {key[:120]!r}")
    out = {}
    for name, core in sorted(cores.items()):
        if name in own and len(own[name]) == 2:
            A, B = own[name][A_SUFFIX], own[name][B_SUFFIX]
        elif basis is not None and name in basis:
            A, B = basis[name].A, basis[name].B
        else:
            raise InvalidUpdate(client, "a core arrived without its basis", module=name)
        out[name] = LoraFactors(A=A, B=B, core=core)
    if set(own) - set(cores):
        raise InvalidUpdate(
            client, "a basis arrived without its core", module=sorted(set(own) - set(cores))[0]
        )
    return out


GRAD_SUFFIX = ".grad"
MAX_GRADIENT = 1e6  # largest |entry| of a round-0 gradient sum accepted


def basis_of(record: ArrayRecord) -> dict[str, LoraFactors]:
    """The basis (B, A) a core download carries, by module (empty when it carries none)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, arr in record.items():
        for suffix in (A_SUFFIX, B_SUFFIX):
            if key.endswith(suffix):
                pairs.setdefault(key.removesuffix(suffix), {})[suffix] = _tensor(arr)
    return {name: LoraFactors(A=p[A_SUFFIX], B=p[B_SUFFIX]) for name, p in pairs.items() if len(p) == 2}


def encode_gradient(gradients: Mapping[str, torch.Tensor], wire: str) -> ArrayRecord:
    """A round-0 gradient sum per module, (m, n), in the wire dtype."""
    return ArrayRecord(
        array_dict={name + GRAD_SUFFIX: _array(g, wire) for name, g in sorted(gradients.items())}
    )


def decode_gradient(
    record: ArrayRecord, client: str, expected: Mapping[str, tuple[int, int]], wire: str
) -> dict[str, torch.Tensor]:
    """A round-0 reply's gradients: exactly one (m, n) array per adapted module, in the wire dtype
    (checked before anything is decoded), finite and at most ``MAX_GRADIENT`` in magnitude."""
    names = {}
    for key, arr in record.items():
        name = key.removesuffix(GRAD_SUFFIX)
        if not key.endswith(GRAD_SUFFIX) or name not in expected:
            raise InvalidUpdate(client, f"unexpected array {key[:120]!r} in the round-0 reply", round=0)
        if arr.dtype != wire or tuple(int(d) for d in arr.shape) != tuple(expected[name]):
            raise InvalidUpdate(
                client, f"{key} is {str(arr.dtype)[:20]} {tuple(arr.shape)}; the run takes {wire} "
                f"{tuple(expected[name])}", round=0,
            )  # fmt: skip
        names[name] = arr
    missing = sorted(set(expected) - set(names))
    if missing:
        raise InvalidUpdate(client, "the round-0 reply lacks a gradient", module=missing[0], round=0)
    out = {}
    for name, arr in sorted(names.items()):
        g = _tensor(arr)
        top = float(g.abs().max()) if g.numel() else 0.0
        if not (math.isfinite(top) and top <= MAX_GRADIENT):
            raise InvalidUpdate(
                client,
                f"gradient out of range: max|G| = {top:.3g} exceeds {MAX_GRADIENT:.0e}",
                module=name,
                round=0,
            )
        out[name] = g
    return out


def check_wire(arr: Array, key: str, client: str, wire: str, round: int | None) -> None:
    """An uploaded array must be declared in the run's wire dtype."""
    if arr.dtype != wire:
        raise InvalidUpdate(
            client, f"{key} arrives as {str(arr.dtype)[:20]!r}; the run's wire dtype is {wire}", round=round
        )


def check_declared_cores(
    record: ArrayRecord, client: str, expected: Mapping[str, tuple[int, int]], wire: str, rank: int,
    round: int | None = None,
) -> None:  # fmt: skip
    """A core upload's arrays as declared: one "{module}.lora_R" of shape (rank, rank) in the wire
    dtype per known module, nothing else, checked before anything is decoded."""
    seen = set()
    for key, arr in record.items():
        name = key.removesuffix(R_SUFFIX)
        if not key.endswith(R_SUFFIX) or name not in expected or name in seen:
            raise InvalidUpdate(client, f"unexpected array {key[:120]!r} in the upload", round=round)
        check_wire(arr, key, client, wire, round)
        shape = tuple(int(d) for d in arr.shape)
        if shape != (rank, rank):
            raise InvalidUpdate(
                client, f"{key} claims shape {shape}; the core is {(rank, rank)}", round=round
            )
        seen.add(name)


def decode_factors(record: ArrayRecord, client: str, *, b_only: bool = False) -> dict[str, LoraFactors]:
    """Inverse of ``encode_factors``; with ``b_only`` A was not sent and is left empty ``(r, 0)``."""
    out = {}
    for name, (A, B) in _pairs(record, client).items():
        if A is None:
            if not b_only:
                raise InvalidUpdate(client, "lora_A is missing", module=name)
            A = torch.zeros(B.shape[1], 0)
        out[name] = LoraFactors(A=A, B=B)
    return out


def check_declared(
    record: ArrayRecord,
    client: str,
    expected: Mapping[str, tuple[int, int]],
    wire: str,
    max_rank: int,
    with_a: bool = True,
    round: int | None = None,
) -> None:
    """Names, counts, dtypes and shapes of an upload's arrays as declared, before any is decoded.

    Every key is a known module's ``.lora_A`` or ``.lora_B`` (at most two per module), every array in
    the run's wire dtype, A ``(r, n)`` and B ``(m, r)`` with the model's ``(m, n)`` and
    ``1 <= r <= max_rank``: a reply of fake modules or of huge claims is refused on its metadata.
    """
    ranks: dict[str, set[int]] = {}
    for key, arr in record.items():
        name, _, side = key.rpartition(".")
        if name not in expected or side not in ("lora_A", "lora_B") or (side == "lora_A" and not with_a):
            raise InvalidUpdate(client, f"unexpected array {key[:120]!r} in the upload", round=round)
        check_wire(arr, key, client, wire, round)
        shape = tuple(int(d) for d in arr.shape)
        m, n = expected[name]
        r = shape[0] if side == "lora_A" and len(shape) == 2 else shape[1] if len(shape) == 2 else -1
        want = (r, n) if side == "lora_A" else (m, r)
        if len(shape) != 2 or shape != want or not 1 <= r <= max_rank:
            takes = f"(r, {n})" if side == "lora_A" else f"({m}, r)"
            raise InvalidUpdate(
                client,
                f"{key} claims shape {shape}; the model takes {takes} with 1 <= r <= {max_rank}",
                round=round,
            )
        ranks.setdefault(name, set()).add(r)
    mixed = sorted(name for name, rs in ranks.items() if len(rs) > 1)
    if mixed:
        raise InvalidUpdate(client, "lora_A and lora_B ranks differ", module=mixed[0], round=round)


@dataclass(frozen=True)
class KnownA:
    """The A that B-only uploads were trained against, known to the server and never sent: ``rows``
    (the largest client rank) and ``of(module, n)``, the (rows, n) matrix (FFA-LoRA's seeded draw,
    FedSVD's last A; ``florist.aggregation.protocols.ClientRules.upload_a``)."""

    rows: int
    of: Callable[[str, int], torch.Tensor]


def decode_upload(
    record: ArrayRecord,
    meta: ConfigRecord,
    client: str,
    *,
    known_a: KnownA | None = None,
    expected: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, LoraFactors]:
    """A client's factors; with ``known_a`` only B was sent and A is the server's own (leading rows).

    With ``expected`` (module -> weight shape), a known A is only looked up for a known module whose
    claimed width and B agree with the model: nothing is allocated from an unchecked claim. The
    server calls ``check_declared`` first, so nothing is decoded from an unchecked claim either.
    """
    scaling = {k.removeprefix("scaling."): float(v) for k, v in meta.items() if k.startswith("scaling.")}  # type: ignore[arg-type]
    pairs = _pairs(record, client)
    out = {}
    for name, (A, B) in pairs.items():
        if name not in scaling:
            raise InvalidUpdate(client, "no scaling was sent", module=name)
        if known_a is not None:
            A = _known_a(meta, name, B, client, known_a, expected)
        elif A is None:
            raise InvalidUpdate(client, "lora_A is missing", module=name)
        out[name] = LoraFactors(A=A, B=B, scaling=scaling[name])
    return out


def _known_a(
    meta: ConfigRecord,
    name: str,
    B: torch.Tensor,
    client: str,
    known_a: KnownA,
    expected: Mapping[str, tuple[int, int]] | None,
) -> torch.Tensor:
    n = meta.get(f"n.{name}")
    r = B.shape[1] if B.ndim == 2 else 0
    if expected is not None and (name not in expected or (B.shape[0], n) != tuple(expected[name])):
        want = expected.get(name)
        raise InvalidUpdate(
            client, f"B {tuple(B.shape)} with n={n!r} does not fit the model's weight {want}", module=name
        )
    if not isinstance(n, int) or n < 1 or not 1 <= r <= known_a.rows:
        raise InvalidUpdate(
            client, f"cannot rebuild the known A (n={n!r}, rank {r}, its rank {known_a.rows})", module=name
        )
    return known_a.of(name, n)[:r]  # (r, n)


def _pairs(record: ArrayRecord, client: str) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    As: dict[str, torch.Tensor] = {}
    Bs: dict[str, torch.Tensor] = {}
    for key, arr in record.items():
        if key.endswith(A_SUFFIX):
            As[key.removesuffix(A_SUFFIX)] = _tensor(arr)
        elif key.endswith(B_SUFFIX):
            Bs[key.removesuffix(B_SUFFIX)] = _tensor(arr)
        else:
            raise InvalidUpdate(client, f"unexpected array {key!r} in the upload")
    orphans = sorted(set(As) - set(Bs))
    if orphans:
        raise InvalidUpdate(client, "lora_A has no lora_B", module=orphans[0])
    return {name: (As.get(name), Bs[name]) for name in sorted(Bs)}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of tensor data in a message (array elements x item size; keys and headers not counted).

    Computed from the arrays' declared shapes and dtypes, with Python integers (no wrap-around); a
    declaration that does not match the data is caught when the array is decoded (``_tensor``).
    """
    total = 0
    for record in content.array_records.values():
        for arr in record.values():
            size = itemsize(arr.dtype) if arr.dtype in WIRE else np.dtype(arr.dtype).itemsize
            total += math.prod(int(d) for d in arr.shape) * size
    return total


def received_bytes(content: RecordDict) -> int:
    """Bytes of array data that actually arrived (what the size guard must bound, whatever is declared)."""
    return sum(len(arr.data) for record in content.array_records.values() for arr in record.values())
