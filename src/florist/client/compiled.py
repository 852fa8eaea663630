"""``train.compile``: the decoder layers under ``torch.compile``, with eager as the fallback.

Each transformers decoder layer (a module whose class name ends in ``DecoderLayer``) is compiled
on its own (``nn.Module.compile``, ``dynamic=True``, so packed rows of every length share one
graph): the layers of a model share their code, so the graph is built once and reused by all of
them, forward and backward; the LoRA and norm elementwise work inside a layer is fused by inductor.
The first step pays the compilation; ``CompiledLayers.report`` states it and what it costs per
step over the round. A compilation that fails (no C++ compiler, an unsupported op) puts the
layers back to eager with one log line, and the step is run again eagerly.

    with compiled_layers(model, enabled=True) as compiled:
        loss = compiled.guard(step, undo)      # undo(): forget what the failed step did
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model`` (transformers names their classes ``...DecoderLayer``)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


class CompiledLayers:
    """Which layers run compiled, and the per-step times that tell what compiling cost."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.active = bool(layers)
        self.step_seconds: list[float] = []

    def guard(self, step: Callable[[], T], undo: Callable[[], None]) -> T:
        """Run ``step``; if it fails while compiled, fall back to eager, ``undo()`` and run it again."""
        if not self.active:
            return step()
        try:
            return step()
        except Exception as exc:  # any compiler failure: eager is always correct
            log.warning(
                "torch.compile failed (%s: %s); training eagerly", type(exc).__name__, _first_line(exc)
            )
            self.restore()
            undo()
            return step()

    def restore(self) -> None:
        """Put every layer back to eager."""
        for layer in self.layers:
            layer._compiled_call_impl = None
        self.active = False

    def compile_seconds(self) -> float:
        """Time the first step took beyond a later one's median (0 before two steps or when eager)."""
        if len(self.step_seconds) < 2:
            return 0.0
        return max(0.0, self.step_seconds[0] - statistics.median(self.step_seconds[1:]))

    def report(self) -> str:
        """One line: the compilation time and its share of the round's steps."""
        steps, extra = len(self.step_seconds), self.compile_seconds()
        total = sum(self.step_seconds)
        return (
            f"torch.compile: {len(self.layers)} decoder layers compiled in about {extra:.1f} s "
            f"(first step {self.step_seconds[0]:.1f} s), {extra / max(total, 1e-9):.0%} of this "
            f"round's {steps} steps ({extra / max(steps, 1):.2f} s per step amortised)"
        )


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool) -> Iterator[CompiledLayers]:
    """Compile ``model``'s decoder layers for the block when ``enabled``; eager again after it."""
    layers = decoder_layers(model) if enabled else []
    if enabled and not layers:
        log.warning("train.compile: no decoder layers found in %s; training eagerly", type(model).__name__)
    state = CompiledLayers(layers)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield state
    finally:
        state.restore()


def _first_line(exc: BaseException) -> Any:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
