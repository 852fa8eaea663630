"""Where a merge-protocol client keeps the global updates it merged: in its base weights, or, on a
quantized base, beside them as a frozen adapter (``florist.aggregation.held``).

    InBase       W0 += B A in every adapted base layer (a full-precision base), as the server does
    BesideBase   W0 frozen as loaded (4-bit / 8-bit); each adapted base layer computes
                 W0 x + B_G (A_G x) through a forward hook, with G the held global updates

Both offer the same four operations, so ``LocalClient`` does not branch on the base:

    fold(U)        merge a global update (BesideBase: under the held adapter's rank cap)
    add(U)         add exactly (a warm start's split moves -B_w A_w in)
    snapshot()     what to put back after a warm split ...
    restore(s)     ... exactly, before the next fold
    digest()       sha256 of what the merges changed: the sync check against the server's model
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from florist.aggregation.held import HeldUpdates
from florist.client.lora_state import base_weights, lora_layers, merge_into_base, set_base_weights
from florist.lora import LoraFactors

Modules = Mapping[str, LoraFactors]


class InBase:
    """The merged updates live in the base weights (``W0 += B A`` in the base layer's dtype)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def fold(self, update: Modules) -> None:
        merge_into_base(self.model, update)

    def add(self, update: Modules) -> None:
        merge_into_base(self.model, update)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return base_weights(self.model)

    def restore(self, snapshot: Any) -> None:
        set_base_weights(self.model, snapshot)

    def digest(self) -> str:
        """sha256 of the adapted modules' base weights (equal on every node after the same merges)."""
        h = hashlib.sha256()
        for name, layer in lora_layers(self.model):
            h.update(name.encode())
            h.update(layer.get_base_layer().weight.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class BesideBase:
    """The merged updates live beside a frozen (quantized) base as ``held``; every adapted base
    layer's output gains ``(x A_G^T) B_G^T``, computed in float32 and added in the layer's dtype."""

    def __init__(self, model: Any, held: HeldUpdates) -> None:
        self.model, self.held = model, held
        self.names = [name for name, _ in lora_layers(model)]
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in lora_layers(model):
            layer.get_base_layer().register_forward_hook(self._hook(name))
        self._sync()

    def _hook(self, name: str) -> Any:
        def add_held(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            factors = self._on_device.get(name)
            if factors is None:
                return out
            B, A = factors  # (m, p), (p, n)
            added: torch.Tensor = ((args[0].to(A.dtype) @ A.mT) @ B.mT).to(out.dtype)
            return out + added

        return add_held

    def _sync(self) -> None:
        """Put the held factors on the device the model computes on."""
        device = next(self.model.parameters()).device
        self._on_device = {name: (f.B.to(device), f.A.to(device)) for name, f in self.held.modules.items()}

    def fold(self, update: Modules) -> None:
        self.held.fold(update)
        self._sync()

    def add(self, update: Modules) -> None:
        self.held.add(update)
        self._sync()

    def snapshot(self) -> HeldUpdates:
        return self.held.copy()

    def restore(self, snapshot: Any) -> None:
        self.held = snapshot
        self._sync()

    def digest(self) -> str:
        return self.held.digest(self.names)
