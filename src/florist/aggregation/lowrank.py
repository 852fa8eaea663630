"""Operations on one low-rank update that clients and the server both run (pure tensor code).

Uplink thresholding: a client of rank r sends the tau_up-truncated SVD of its own update, found
from QRs of its factors and an r x r core (``linalg.factored_svd``), never an m x n matrix:

    s B (m, r) = Q_B R_B,   A^T (n, r) = Q_A R_A,   R_B R_A^T = U_c diag(S) V_c^T     (r x r)
    B_up = Q_B U_c[:, :q] diag(S_q)   (m, q),      A_up = V_c[:, :q]^T Q_A^T   (q, n)

with q the smallest rank holding tau_up of the energy; ``B_up @ A_up == s B @ A`` at tau_up = 1.

Warm start: the leading r directions of a global update, with the singular values on B (the
default, as FlexLoRA and the paper's global pair split them) or evenly on both factors,

    U_r diag(S_r) V_r^T  ->  B = U_r diag(S_r),  A = V_r^T                          ("orthonormal")
                         ->  B = U_r diag(sqrt(S_r)),  A = diag(sqrt(S_r)) V_r^T    ("balanced")

so a client can hold them in its LoRA while its base weights hold the rest (``florist.client``).
The global update split is the last round's (``"last"``) or the sum of every round's the client has
merged (``"accumulated"``, FlexLoRA's continuation at FLoRIST's bytes: ``sum_t B_t A_t`` is known to
every client and to the server, so nothing more is sent).

Wire rounding: factors cast to a 16-bit wire dtype and back to float32, as a 16-bit message does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from florist.aggregation.base import AggregationResult
from florist.aggregation.linalg import basis_times, factored_svd
from florist.aggregation.rank_policy import rank_for_energy
from florist.dtypes import WIRE, torch_dtype
from florist.errors import ConfigError
from florist.lora.update import ClientUpdate, LoraFactors, sum_of_rounds

WARM_SPLITS = ("balanced", "orthonormal")  # how leading_split shares the singular values
WARM_FROM = ("last", "accumulated")  # which global update a warm start splits (warm_source)


def truncate_update(f: LoraFactors, tau: float) -> tuple[LoraFactors, float]:
    """The ``tau``-energy truncation of ``s B A`` as effective factors, and the energy fraction kept."""
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"uplink tau must be in (0, 1], got {tau}")
    B, A = f.effective(torch.float32)  # (m, r), (r, n)
    svd = factored_svd(B, A)
    q = rank_for_energy(svd.S, tau)
    B_up, A_up = svd.truncate(q)  # (m, q), (q, n)
    kept = float(svd.S[:q].double().square().sum() / svd.S.double().square().sum().clamp_min(1e-300))
    return LoraFactors(A=A_up.contiguous(), B=B_up.contiguous()), kept


def leading_split(
    f: LoraFactors, r: int, split: str = "balanced", dtype: torch.dtype = torch.float32
) -> LoraFactors:
    """The best rank-``min(r, rank)`` part of ``s B A = U S V^T``, as effective factors.

    ``split`` puts the singular values on both sides (``"balanced"``: ``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``) or all on B (``"orthonormal"``: ``B = U S``, ``A = V^T``, FlexLoRA's and
    the paper's global split, whose A rows have unit norm like a fresh LoRA's A rather than
    ``sqrt(sigma)``). The product is the same either way; only the training that follows differs.
    """
    B, A = f.effective(dtype)
    svd = factored_svd(B, A)
    p = min(r, int(svd.S.numel()))
    U, Vh = basis_times(svd.left, svd.U[:, :p]), basis_times(svd.right, svd.Vh[:p].mT).mT  # (m, p), (p, n)
    S = svd.S[:p].clamp_min(0)  # (p,)
    if split == "orthonormal":
        return LoraFactors(A=Vh.contiguous(), B=(U * S).contiguous())
    if split not in WARM_SPLITS:
        raise ConfigError(f"warm split must be one of {list(WARM_SPLITS)}, got {split!r}")
    root = S.sqrt()
    return LoraFactors(A=(root[:, None] * Vh).contiguous(), B=(U * root).contiguous())


def rebalanced(f: LoraFactors, dtype: torch.dtype = torch.float32) -> LoraFactors:
    """The same product ``s B A`` as balanced factors of the same rank (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``, zero columns where the product has lower rank): whatever factorisation a
    client chose (a tiny B with a huge A, columns that cancel), no factor is larger than the product
    needs. For methods that pass received factors on (FLoRA's stack)."""
    return leading_split(f, f.rank, "balanced", dtype).leading(f.rank, pad=True)


def prepare_upload(
    modules: Mapping[str, LoraFactors], uplink_tau: float | None, wire: str
) -> tuple[dict[str, LoraFactors], dict[str, float]]:
    """What a client sends: its factors, truncated to ``uplink_tau`` of their energy (if set) and
    rounded to the wire dtype; with the energy kept per module (1.0 when nothing is cut)."""
    out, kept = dict(modules), dict.fromkeys(modules, 1.0)
    if uplink_tau is not None:
        for name, f in modules.items():
            out[name], kept[name] = truncate_update(f, uplink_tau)
    if wire != "float32":
        out = {name: to_wire(f, wire) for name, f in out.items()}
    return out, kept


def result_to_wire(result: AggregationResult, wire: str) -> AggregationResult:
    """``result`` with every download rounded to the wire dtype: what clients receive, so the server's
    model follows the same rounded update and clients and server hold the same weights."""
    if wire == "float32":
        return result
    per_client = None
    if result.per_client is not None:
        per_client = {c: {n: to_wire(f, wire) for n, f in m.items()} for c, m in result.per_client.items()}
    glob = {n: to_wire(f, wire) for n, f in result.global_update.items()}
    return replace(result, global_update=glob, per_client=per_client)


def warm_parts(
    global_update: Mapping[str, LoraFactors], rank: int, split: str = "balanced"
) -> dict[str, LoraFactors]:
    """What a client of ``rank`` warm-starts from after merging ``global_update`` (``leading_split``).
    The server only needs the product, which ``split`` does not change."""
    return {name: leading_split(f, rank, split) for name, f in global_update.items()}


def warm_source(merged: Sequence[Mapping[str, LoraFactors]], warm_from: str) -> Mapping[str, LoraFactors]:
    """The update a warm start splits, from the global updates merged so far (oldest first): the
    last one, or all of them side by side (``sum_t B_t A_t``, rank ``sum_t p_t``)."""
    if warm_from not in WARM_FROM:
        raise ConfigError(f"warm start source must be one of {list(WARM_FROM)}, got {warm_from!r}")
    if not merged:
        raise ValueError("warm start needs at least one merged global update")
    return merged[-1] if warm_from == "last" else sum_of_rounds(merged)


def leading_columns(global_update: Mapping[str, LoraFactors], rank: int) -> dict[str, LoraFactors]:
    """The leading ``rank`` components of each module's factors as sent (no SVD): what a
    merge-and-continue client (FedEx-LoRA) moves back into its LoRA after merging ``global_update``."""
    return {name: f.leading(rank) for name, f in global_update.items()}


def without_warm_part(update: ClientUpdate, warm: Mapping[str, LoraFactors]) -> ClientUpdate:
    """A warm-started client's round delta from its upload: ``s B' A' - B_w A_w`` per module.

    The client's LoRA started this round at its warm part ``B_w A_w`` (``leading_split`` of the
    global update it merged last) and its base weights hold the rest, so what it trained this
    round is its upload minus the warm part, in factored form (rank r_k + p):

        [s B' | -B_w] (m, r_k + p)  @  [A'; A_w] (r_k + p, n)  ==  s B' A' - B_w A_w
    """
    modules = {}
    for name, f in update.modules.items():
        B, A = f.effective(torch.float32)
        w = warm[name]
        modules[name] = LoraFactors(A=torch.cat([A, w.A]), B=torch.cat([B, -w.B], dim=1))
    return ClientUpdate(update.client_id, update.num_examples, modules)


def to_wire(f: LoraFactors, wire_dtype: str) -> LoraFactors:
    """``f`` as it arrives after a trip through ``wire_dtype``: rounded, then float32 again. With a
    core only the core travels (B and A are the basis both sides already hold, as it was sent)."""
    dt = torch_dtype(wire_dtype, "wire dtype", WIRE)
    if f.core is not None:
        return replace(f, core=f.core.to(dt).float())
    return LoraFactors(A=f.A.to(dt).float(), B=f.B.to(dt).float(), scaling=f.scaling)
