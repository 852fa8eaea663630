"""Local LoRA training of a causal LM: a plain torch loop over peft's LoRA layers.

    x -> W0 x + (alpha / r) B A x        only A and B train (A frozen for FFA-LoRA)

The loop is deliberately bare (AdamW, optional gradient accumulation) so that it runs at least as
fast as a hand-written peft + torch loop (benchmarks/client_throughput.py); the vocabulary projection
runs on labelled positions only (``florist.client.lm_loss``). ``precision`` (``florist.precision``)
picks bf16 autocast on CUDA GPUs and CPUs with native bf16 instructions when ``auto``; LoRA factors
and the optimizer state stay float32 in either precision. ``batching = "packed"`` computes real
tokens only (``florist.data.tokenize.pack``); ``compile`` runs the decoder layers under
``torch.compile`` (``florist.client.compiled``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from florist.client.compiled import compiled_layers
from florist.client.lm_loss import mean_token_loss, per_example_loss
from florist.client.packed_attention import packed_attention
from florist.client.progress import StepBar
from florist.config.training import LORA_INITS, TrainSettings
from florist.data.records import Example
from florist.data.tokenize import IGNORE, Encoded, computed_positions, encode, make_batch, real_tokens
from florist.errors import ConfigError
from florist.precision import Precision, log_choice, resolve
from florist.privacy.client_level import noise_generator
from florist.privacy.sample_level import SamplePlan, clipped_sum, noised_step, poisson_rows
from florist.seeds import derive_seed

log = logging.getLogger(__name__)
__all__ = ["LORA_INITS", "TrainSettings", "TrainStats", "encode_all", "train"]


@dataclass
class TrainStats:
    steps: int = 0
    loss: float = float("nan")
    tokens: int = 0  # real tokens a forward pass saw (prompt and response, no padding)
    positions: int = 0  # positions computed: tokens plus padding (equal when packed)
    label_tokens: int = 0  # tokens the loss was taken on
    seconds: float = 0.0
    compile_seconds: float = 0.0  # estimated time the first step spent compiling (train.compile)
    epsilon: float | None = None  # DP-SGD: the client's epsilon after this round (privacy.mode = dp-sgd)
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Useful (real, non-padding) tokens per second."""
        return self.tokens / self.seconds if self.seconds else 0.0


class BatchStream:
    """Shuffled batches of encoded examples from position ``start`` of an endless stream.

    The stream is epoch after epoch of ``randperm(n)`` seeded by ``(seed, epoch)``, so a client
    that trains round t from ``start = (t - 1) x examples_per_round`` continues where round t - 1
    stopped, and a restarted process draws the same batches.
    """

    def __init__(self, encoded: Sequence[Encoded], batch_size: int, seed: int, start: int = 0) -> None:
        if not encoded:
            raise ConfigError("no training examples")
        self.encoded, self.batch_size, self.seed = encoded, batch_size, seed
        self.position = start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _index(self, i: int) -> int:
        n = len(self.encoded)
        epoch = i // n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(n, generator=g)
        return int(self._perm[i % n])

    def rows(self, start: int, stop: int) -> list[int]:
        """The row indices at stream positions ``start`` to ``stop`` (what those batches draw)."""
        return [self._index(i) for i in range(start, stop)]

    def next(self) -> list[Encoded]:
        batch = [self._index(self.position + j) for j in range(self.batch_size)]
        self.position += self.batch_size
        return [self.encoded[i] for i in batch]


def encode_all(examples: Sequence[Example], tokenizer: Any, s: TrainSettings) -> list[Encoded]:
    """Encode every example (long ones truncated, see ``florist.data.tokenize``); one left with no
    label token (only when ``max_length`` is tiny) is dropped with a warning."""
    encoded = [encode(ex, tokenizer, s.max_length, s.train_on_inputs) for ex in examples]
    kept = [e for e in encoded if any(label != IGNORE for label in e.labels)]
    if len(kept) < len(encoded):
        log.warning(
            "%d of %d examples have no response token within max_length=%d and are skipped",
            len(encoded) - len(kept),
            len(encoded),
            s.max_length,
        )
    if encoded and not kept:
        raise ConfigError(
            f"no example has a response token within max_length={s.max_length}; raise max_length"
        )
    return kept


def train(
    model: Any,
    encoded: Sequence[Encoded],
    s: TrainSettings,
    *,
    seed: int,
    pad_id: int,
    desc: str = "train",
    data_seed: int | None = None,
    start: int = 0,
    on_step: Callable[[TrainStats], None] | None = None,
    progress: bool = True,
    dp: SamplePlan | None = None,
    dp_seed: int | None = None,
) -> TrainStats:
    """Run ``s.num_steps`` optimizer steps on the trainable parameters of ``model`` (``progress``: a
    step bar where one can be drawn, ``florist.client.progress``).

    ``seed`` drives dropout; batches come from ``BatchStream(encoded, ..., data_seed, start)``
    (``data_seed`` defaults to ``seed``). ``on_step(stats)`` is called after every optimizer step
    (``stats.steps`` of them so far), e.g. to snapshot the adapter part-way through a round. With
    ``dp`` the steps are DP-SGD's (``florist.privacy.sample_level``): Poisson batches, per-example
    clipping and noise, float32; ``dp_seed`` makes its sampling and noise reproducible (not private).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (is the LoRA adapter attached?)")
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    stream = BatchStream(encoded, s.batch_size, seed if data_seed is None else data_seed, start)
    device = next(model.parameters()).device
    precision = resolve(s.precision, device)
    log_choice("training", precision)
    if dp is not None:
        return _train_private(model, encoded, s, dp, seed, pad_id, desc, on_step, progress, dp_seed)
    stats, began = TrainStats(), time.perf_counter()
    torch.manual_seed(seed)  # dropout masks
    model.train()
    steps = s.num_steps(len(encoded))
    bar = StepBar(steps, desc, progress)
    with (
        precision.frozen_weights_cast(model),
        packed_attention(model),
        compiled_layers(model, s.compile) as compiled,
        checkpointed(model, s.gradient_checkpointing),
    ):
        for _ in range(steps):
            t0 = time.perf_counter()
            undo = _undoer(opt, stream, stats, keep_rng=compiled.active)
            loss = compiled.guard(lambda: _accumulate(model, stream, s, pad_id, precision, stats), undo)
            if s.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.losses.append(loss)
            bar.step(loss)
            compiled.step_seconds.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(stats)
        if compiled.active:
            stats.compile_seconds = compiled.compile_seconds()
            log.info("%s: %s", desc, compiled.report())
    bar.close()
    model.eval()
    stats.seconds = time.perf_counter() - began
    stats.loss = sum(stats.losses) / len(stats.losses)
    return stats


def _train_private(
    model: Any, encoded: Sequence[Encoded], s: TrainSettings, dp: SamplePlan, seed: int, pad_id: int,
    desc: str, on_step: Callable[[TrainStats], None] | None, progress: bool, dp_seed: int | None,
) -> TrainStats:  # fmt: skip
    """DP-SGD steps (``florist.privacy.sample_level``): Opacus's per-example gradients of the LoRA
    parameters, clipped and noised here; padded batches, float32. A step's Poisson batch (expected size
    ``batch_size x grad_accum``) goes through ``batch_size`` rows at a time, their clipped gradients
    summed, then noised once."""
    from opacus import GradSampleModule

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    device = next(model.parameters()).device
    generator = noise_generator(dp_seed, seed)
    stats, began, n = TrainStats(), time.perf_counter(), len(encoded)
    torch.manual_seed(seed)  # dropout masks
    steps = s.num_steps(n)
    bar = StepBar(steps, desc, progress)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus's, every step
            wrapped.train()
            for _ in range(steps):
                rows = poisson_rows(n, dp.q, generator)
                total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
                losses = []
                for at in range(0, len(rows), s.batch_size):  # the logical batch, batch_size rows at a time
                    chunk = rows[at : at + s.batch_size]
                    padded = make_batch([encoded[i] for i in chunk], pad_id, "padded")
                    batch = {k: v.to(device) for k, v in padded.items()}
                    value = per_example_loss(wrapped, batch)
                    value.backward()  # type: ignore[no-untyped-call]
                    losses.append(float(value.detach()) * len(chunk))
                    clipped_sum(params, dp.clip, total)
                    stats.tokens += real_tokens(batch)
                    stats.positions += computed_positions(batch)
                    stats.label_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
                loss = sum(losses) / len(rows) if rows else float("nan")
                noised_step(params, total, dp.q * n, dp.clip, dp.sigma, generator)
                opt.step()
                opt.zero_grad(set_to_none=True)
                stats.steps += 1
                stats.losses.append(loss)
                bar.step(loss)
                if on_step is not None:
                    on_step(stats)
    finally:
        wrapped._close()  # the hooks go; the model stays the client's across rounds
        for p in params:
            p.grad_sample = None
    bar.close()
    model.eval()
    stats.seconds = time.perf_counter() - began
    seen = [x for x in stats.losses if x == x]
    stats.loss = sum(seen) / len(seen) if seen else float("nan")
    return stats


def gradient_sum(
    model: Any, encoded: Sequence[Encoded], s: TrainSettings, layers: dict[str, Any], *, rows: int,
    pad_id: int, data_seed: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The sum over batches of each batch's mean-loss gradient with respect to the base weight of
    every layer in ``layers`` (name -> LoRA layer), over the first ``rows`` rows of the client's data
    stream (float32, on the CPU): Fed-SB's round 0. Nothing trains; the weights are left as found."""
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    device = next(model.parameters()).device
    precision = resolve(s.precision, device)
    stream = BatchStream(encoded, s.batch_size, data_seed)
    total = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    was_training = model.training
    model.train()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        done = 0
        while done < rows:
            batch_rows = stream.next()[: rows - done]
            batch = {k: v.to(device) for k, v in make_batch(batch_rows, pad_id, s.batching).items()}
            with precision.autocast():
                loss = mean_token_loss(model, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            for name, w in weights.items():
                assert w.grad is not None
                total[name] += w.grad.detach().float().cpu()
                w.grad = None
            done += len(batch_rows)
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return total


@contextmanager
def checkpointed(model: Any, on: bool) -> Iterator[None]:
    """With ``on``, transformers' gradient checkpointing (non-reentrant: the frozen embeddings need no
    grad hook) for the duration: each decoder layer's activations are recomputed in the backward pass
    instead of kept, the same gradients for less memory. Off again on exit (evaluation keeps nothing)."""
    inner = getattr(getattr(model, "base_model", model), "model", model)  # peft -> the transformers model
    if not on or not hasattr(inner, "gradient_checkpointing_enable"):
        yield
        return
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        inner.gradient_checkpointing_disable()


def _undoer(
    opt: torch.optim.Optimizer, stream: BatchStream, stats: TrainStats, keep_rng: bool
) -> Callable[[], None]:
    """A function that forgets the step about to run (one that failed to compile): its gradients,
    the batches it drew, its token counts and, with ``keep_rng``, its dropout draws."""
    position, counted = stream.position, (stats.tokens, stats.positions, stats.label_tokens)
    rng = torch.get_rng_state() if keep_rng else None

    def undo() -> None:
        opt.zero_grad(set_to_none=True)
        stream.position = position
        stats.tokens, stats.positions, stats.label_tokens = counted
        if rng is not None:
            torch.set_rng_state(rng)

    return undo


def _accumulate(
    model: Any, stream: BatchStream, s: TrainSettings, pad_id: int, precision: Precision, stats: TrainStats
) -> float:
    """Forward and backward ``grad_accum`` micro-batches; returns their mean loss."""
    device, total = next(model.parameters()).device, 0.0
    for _ in range(s.grad_accum):
        batch = {k: v.to(device) for k, v in make_batch(stream.next(), pad_id, s.batching).items()}
        with precision.autocast():
            loss = mean_token_loss(model, batch) / s.grad_accum
        loss.backward()  # type: ignore[no-untyped-call]
        total += float(loss.detach())
        stats.tokens += real_tokens(batch)
        stats.positions += computed_positions(batch)
        stats.label_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total
