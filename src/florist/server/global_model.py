"""The server's copy of the global model, for evaluation and for checking clients' weights.

merge protocols (florist, flora,     W = W0 + B_1 A_1 + B_2 A_2 + ...   merged in round order, with
fedex):                              the same operation clients use, so the weights agree bitwise
other protocols:                     W = W0 + B_g A_g  of the latest global adapter
merge protocols, quantized clients:  W = W0 + B_G A_G  with G the global adapter the clients hold
                                     beside their frozen base (``florist.aggregation.held``), folded
                                     the same way: the sync digest is G's, equal to theirs bitwise
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.aggregation.held import HeldUpdates
from florist.aggregation.protocols import protocol_of
from florist.lora import LoraFactors
from florist.lora.update import add_update


def adapted_shapes(model: Any, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Weight shape ``(m, n)`` of every linear module LoRA adapts (peft's rule: the name or its suffix)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out[name] = (int(module.out_features), int(module.in_features))
    return out


class GlobalModel:
    """A plain causal LM whose adapted weights follow the aggregated updates."""

    def __init__(
        self, model: Any, tokenizer: Any, protocol: ClientProtocol, held: HeldUpdates | None = None
    ) -> None:
        self.model, self.tokenizer, self.protocol = model, tokenizer, protocol
        self.rules = protocol_of(protocol)
        self.held = held  # what quantized clients hold (``FloristConfig.held_updates``), else None
        self._base: dict[str, torch.Tensor] = {}  # W0 of adapted modules (non-merge or held)
        self.rounds: list[int] = []

    def weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight  # type: ignore[no-any-return]

    @torch.no_grad()
    def apply(self, round: int, update: Mapping[str, LoraFactors]) -> None:
        """Fold round ``round``'s global update into the weights."""
        if self.held is not None:
            self.held.fold(update)
            update = self.held.modules  # W = W0 + G, G as the clients hold it
        for name, f in sorted(update.items()):
            W = self.weight(name)
            if not self.rules.merges or self.held is not None:  # the adapter replaces the last
                base = self._base.setdefault(name, W.detach().clone())
                W.copy_(base)
            add_update(W, f)
        self.rounds.append(round)

    def apply_result(self, round: int, result: AggregationResult) -> None:
        self.apply(round, result.global_update)

    def digest(self, names: list[str]) -> str:
        """sha256 of the named weights in order (a node's ``Node.digest`` over its adapted modules), or
        of the held global adapter's factors when clients hold one."""
        if self.held is not None:
            return self.held.digest(names)
        h = hashlib.sha256()
        for name in names:
            h.update(name.encode())
            h.update(self.weight(name).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
