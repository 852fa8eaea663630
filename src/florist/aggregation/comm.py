"""Communication accounting: exact bytes each client uploads and downloads, per module.

Uplink is what a client sends (A and B of its own rank; only B for FFA-LoRA and FedSVD). Downlink
is what the server sends that client (``AggregationResult.download``; only B for FFA-LoRA). Sizes
are tensor elements times the wire dtype's size; message framing is not counted.

The paper's efficiency metric (FLoRIST, Table 1) is ``1 / sum over adapted matrices of the global
rank``, reported x 10^-4. For methods whose clients download different ranks, the largest rank a
client downloads for a module is counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from florist.aggregation.base import AggregationResult
from florist.aggregation.protocols import protocol_of
from florist.dtypes import itemsize
from florist.lora.update import ClientUpdate, LoraFactors


def wire_bytes(wire_dtype: str) -> int:
    """Bytes per element of ``wire_dtype`` (float64 allowed: ``florist aggregate --wire-dtype``)."""
    return itemsize(wire_dtype)


@dataclass(frozen=True)
class CommReport:
    """Bytes per client and module, both directions, for one round."""

    wire_dtype: str
    uplink: dict[str, dict[str, int]]
    downlink: dict[str, dict[str, int]]

    @property
    def uplink_total(self) -> int:
        return sum(sum(m.values()) for m in self.uplink.values())

    @property
    def downlink_total(self) -> int:
        return sum(sum(m.values()) for m in self.downlink.values())

    def per_module(self, direction: str) -> dict[str, int]:
        """Bytes summed over clients, per module; ``direction`` is "uplink" or "downlink"."""
        table = self.uplink if direction == "uplink" else self.downlink
        out: dict[str, int] = {}
        for modules in table.values():
            for name, nbytes in modules.items():
                out[name] = out.get(name, 0) + nbytes
        return out


def _numel(f: LoraFactors, with_a: bool) -> int:
    """Elements that travel: the core alone when there is one (both sides hold B and A), else B and
    A (A only ``with_a``)."""
    if f.core is not None:
        return f.core.numel()
    return f.B.numel() + (f.A.numel() if with_a else 0)


def communication(
    updates: Sequence[ClientUpdate], result: AggregationResult, wire_dtype: str = "float32"
) -> CommReport:
    """Exact bytes of one round of ``result.method`` for the clients in ``updates``."""
    size = wire_bytes(wire_dtype)
    up_a = protocol_of(result.protocol).uploads_a
    up = {
        u.client_id: {n: _numel(f, up_a) * size for n, f in sorted(u.modules.items())}
        for u in sorted(updates, key=lambda u: u.client_id)
    }
    down = {
        cid: {n: _numel(f, result.sends_a) * size for n, f in sorted(result.download(cid).items())}
        for cid in sorted(up)
    }
    return CommReport(wire_dtype=wire_dtype, uplink=up, downlink=down)


def init_bytes(
    gradients: Mapping[str, Mapping[str, Tensor]], start: AggregationResult, wire_dtype: str
) -> tuple[int, int]:
    """Bytes of a round 0 (Fed-SB): each client's gradient up (m x n per module) and the starting
    adapter down to each (the basis B and A and the core R_0); ``gradients`` by client id."""
    size = wire_bytes(wire_dtype)
    up = sum(g.numel() for grads in gradients.values() for g in grads.values()) * size
    each = sum(t.numel() for f in start.global_update.values() for t in f.tensors()) * size
    return up, each * len(gradients)


def download_ranks(result: AggregationResult) -> dict[str, int]:
    """Largest rank any client downloads, per module."""
    if result.per_client is None:
        return result.ranks
    ranks: dict[str, int] = {}
    for modules in result.per_client.values():
        for name, f in modules.items():
            ranks[name] = max(ranks.get(name, 0), f.rank)
    return ranks


def efficiency(result: AggregationResult) -> float:
    """The paper's communication efficiency, in units of 10^-4: ``1e4 / sum(global ranks)``."""
    return 1e4 / sum(download_ranks(result).values())
