"""Moving LoRA state between a peft model and florist's ``LoraFactors``.

A peft LoRA layer computes ``x -> W0 x + s * B A x`` with ``s = layer.scaling[adapter]``.
``extract`` returns ``LoraFactors(A, B, s)``; ``assign`` writes effective factors back as
``B = B_eff / s`` so ``s * B @ A`` is what the server sent; ``merge_into_base`` adds
``B_g @ A_g`` to ``W0`` (the FLoRA / FLoRIST protocol) and ``reinit`` starts a fresh LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from florist.errors import ConfigError
from florist.lora import LoraFactors
from florist.lora.seeded import seeded_a
from florist.lora.update import add_update

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."


def lora_layers(peft_model: Any) -> Iterator[tuple[str, Any]]:
    """``(module name as in PEFT files, layer)`` for every LoRA layer, sorted by name."""
    found = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            found.append((name.removeprefix(PEFT_PREFIX), module))
    yield from sorted(found, key=lambda t: t[0])


def extract(peft_model: Any) -> dict[str, LoraFactors]:
    """Detached float32 CPU copies of every layer's ``(A, B, scaling)``: what a client uploads and
    the server aggregates, wherever the model runs."""
    return {
        name: LoraFactors(
            A=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),  # (r, n)
            B=layer.lora_B[ADAPTER].weight.detach().float().cpu().clone(),  # (m, r)
            scaling=float(layer.scaling[ADAPTER]),
        )
        for name, layer in lora_layers(peft_model)
    }


def assign(peft_model: Any, factors: Mapping[str, LoraFactors], *, b_only: bool = False) -> None:
    """Load effective factors (scaling folded into B) into the layers: ``B = B_eff / s``."""
    layers = dict(lora_layers(peft_model))
    _check_same_modules(layers, factors)
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            B_eff, A = f.effective()
            A_w, B_w = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if B_w.shape != B_eff.shape or (not b_only and A_w.shape != A.shape):
                raise ConfigError(
                    f"module {name!r}: cannot load factors B {tuple(B_eff.shape)}, A {tuple(A.shape)} "
                    f"into a LoRA layer of B {tuple(B_w.shape)}, A {tuple(A_w.shape)}"
                )
            B_w.copy_(B_eff / float(layer.scaling[ADAPTER]))
            if not b_only:
                A_w.copy_(A)


def assign_leading(peft_model: Any, factors: Mapping[str, LoraFactors]) -> None:
    """Write effective factors of rank ``p <= r`` into the leading rows of A and columns of B.

    The remaining rows and columns keep what they hold (a fresh LoRA: seeded A, zero B), so the
    layer computes ``s B A = B_eff A_eff`` + nothing from the rest while their B columns are zero.
    """
    layers = dict(lora_layers(peft_model))
    _check_same_modules(layers, factors)
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            A_w, B_w = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, n), (m, r)
            B_eff, A = f.effective()
            p = A.shape[0]
            if p > A_w.shape[0] or B_eff.shape[0] != B_w.shape[0] or A.shape[1] != A_w.shape[1]:
                raise ConfigError(
                    f"module {name!r}: cannot load rank-{p} factors B {tuple(B_eff.shape)}, "
                    f"A {tuple(A.shape)} into a LoRA layer of B {tuple(B_w.shape)}, A {tuple(A_w.shape)}"
                )
            A_w[:p].copy_(A)
            B_w[:, :p].copy_(B_eff / float(layer.scaling[ADAPTER]))


def base_weights(peft_model: Any) -> dict[str, torch.Tensor]:
    """Copies of the base weights ``W0`` of every LoRA layer."""
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in lora_layers(peft_model)}


def set_base_weights(peft_model: Any, weights: Mapping[str, torch.Tensor]) -> None:
    """Write ``weights`` (from ``base_weights``) back into the base layers."""
    layers = dict(lora_layers(peft_model))
    with torch.no_grad():
        for name, w in weights.items():
            layers[name].get_base_layer().weight.copy_(w)


def merge_into_base(peft_model: Any, update: Mapping[str, LoraFactors]) -> None:
    """``W0 += B_g @ A_g`` for every module, in the base layer's dtype."""
    layers = dict(lora_layers(peft_model))
    _check_same_modules(layers, update)
    with torch.no_grad():
        for name, f in update.items():
            W = layers[name].get_base_layer().weight  # (m, n)
            add_update(W, f)


def reinit(peft_model: Any, seed: int, *, draw_rank: int | None = None, freeze_a: bool = False) -> None:
    """A fresh LoRA: ``A ~ U(-1/sqrt(n), 1/sqrt(n))`` from ``seed`` and the module name, ``B = 0``.

    A is the leading ``r`` rows of a ``(draw_rank, n)`` draw (``draw_rank`` defaults to the layer's
    rank ``r``), so clients of different ranks that share a seed and ``draw_rank`` hold nested A's:
    the shared init and FFA-LoRA's frozen A. ``freeze_a`` (FFA-LoRA) stops A from training.
    """
    with torch.no_grad():
        for name, layer in lora_layers(peft_model):
            A_w = layer.lora_A[ADAPTER].weight  # (r, n)
            r, n = A_w.shape
            rows = draw_rank if draw_rank is not None else r
            if rows < r:
                raise ConfigError(f"module {name!r}: shared A rank {rows} is below the client's rank {r}")
            A_w.copy_(seeded_a(seed, name, rows, n)[:r])
            layer.lora_B[ADAPTER].weight.zero_()
            A_w.requires_grad_(not freeze_a)


def _check_same_modules(layers: Mapping[str, Any], factors: Mapping[str, LoraFactors]) -> None:
    missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or extra:
        raise ConfigError(
            f"update does not match the model's LoRA layers: missing {missing[:3]}, extra {extra[:3]}"
        )
