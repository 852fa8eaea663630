"""Moving LoRA state between a peft model and florist's ``LoraFactors``.

A peft LoRA layer computes ``x -> W0 x + s * B A x`` with ``s = layer.scaling[adapter]``.
``extract`` returns ``LoraFactors(A, B, s)``; ``assign`` writes effective factors back as
``B = B_eff / s`` so ``s * B @ A`` is what the server sent; ``merge_into_base`` adds
``B_g @ A_g`` to ``W0`` (the FLoRA / FLoRIST protocol) and ``reinit`` starts a fresh LoRA.

Factors with a core (Fed-SB: ``s B R A``) load as a frozen basis: A is lora_A's weight, frozen, and
lora_B's weight becomes ``B @ R`` (a parametrization) with R, r x r, its only trainable parameter;
``extract`` returns such a layer's basis and R as ``LoraFactors(A, B, s, core=R)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.utils import parametrize

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


class BasisTimesCore(torch.nn.Module):
    """lora_B's weight as ``basis @ R``: the basis (m, r) a buffer, R (r, r) the trained parameter."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        return self.basis.to(core.dtype) @ core  # type: ignore[operator]


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def extract(peft_model: Any) -> dict[str, LoraFactors]:
    """Detached float32 CPU copies of every layer's ``(A, B, scaling)`` (and core, ``has_core``):
    what a client uploads and the server aggregates, wherever the model runs."""
    out = {}
    for name, layer in lora_layers(peft_model):
        A, s, lora_B = layer.lora_A[ADAPTER].weight, float(layer.scaling[ADAPTER]), layer.lora_B[ADAPTER]
        if has_core(lora_B):
            core = lora_B.parametrizations.weight
            out[name] = LoraFactors(A=_copy(A), B=_copy(core[0].basis), scaling=s, core=_copy(core.original))
        else:
            out[name] = LoraFactors(A=_copy(A), B=_copy(lora_B.weight), scaling=s)  # (r, n), (m, r)
    return out


def has_core(lora_B: Any) -> bool:
    """Is this lora_B a basis times a trained core (``load_core``)?"""
    return parametrize.is_parametrized(lora_B, "weight")


def _load_core(layer: Any, name: str, f: LoraFactors) -> None:
    """Fed-SB's layer: A and B the frozen basis of ``f``, R = its effective core / the layer's scaling."""
    A_w, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER]
    m, r = lora_B.weight.shape
    assert f.core is not None
    if tuple(f.B.shape) != (m, r) or tuple(f.A.shape) != tuple(A_w.shape):
        raise ConfigError(
            f"module {name!r}: cannot load a basis B {tuple(f.B.shape)}, A {tuple(f.A.shape)} into a LoRA "
            f"layer of B {(m, r)}, A {tuple(A_w.shape)}"
        )
    device = A_w.device
    if not has_core(lora_B):
        lora_B.weight.requires_grad_(False)
        parametrize.register_parametrization(
            lora_B, "weight", BasisTimesCore(f.B.float().to(device)), unsafe=True
        )
        lora_B.parametrizations.weight.original = torch.nn.Parameter(torch.zeros(r, r, device=device))
    params = lora_B.parametrizations.weight
    params[0].basis.copy_(f.B)
    A_w.copy_(f.A)
    A_w.requires_grad_(False)
    params.original.copy_(f.core * (f.scaling / float(layer.scaling[ADAPTER])))


def assign(peft_model: Any, factors: Mapping[str, LoraFactors], *, b_only: bool = False) -> None:
    """Load effective factors (scaling folded into B) into the layers: ``B = B_eff / s``."""
    layers = dict(lora_layers(peft_model))
    _check_same_modules(layers, factors)
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            if f.core is not None:
                _load_core(layer, name, f)
                continue
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
