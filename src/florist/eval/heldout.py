"""Held-out loss: mean cross-entropy per response token, with per-example losses for paired comparisons.

    loss = sum_i sum_{t in response(i)} -log p(x_t | x_<t)  /  sum_i |response(i)|     (not a mean of means)
    perplexity = exp(loss)

Examples are encoded exactly as for training (``florist.data.tokenize.encode``: Alpaca prompt, loss on the
response and eos, truncated to ``max_length``) and scored in length-sorted batches; the per-example
losses come back in input order, so two models can be compared row by row.

    from florist.client.model import load_model
    from florist.data.loaders import load_examples
    model, tokenizer = load_model()
    print(heldout_loss(model, tokenizer, load_examples("../shared/data/dolly-8clients/test.json")))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from florist.client.lm_loss import labelled_logits
from florist.client.packed_attention import packed_attention
from florist.data.records import Example
from florist.data.tokenize import encode, example_of_position, length_sorted_batches, make_batch
from florist.errors import ConfigError


@dataclass(frozen=True)
class LossResult:
    """Held-out loss of one model on one list of examples.

    Attributes
    ----------
    loss : float
        Mean cross-entropy (nats) per response token over all examples.
    perplexity : float
        ``exp(loss)``.
    n_tokens : int
        Number of response tokens scored (after truncation to ``max_length``).
    per_example : list[float]
        Mean loss per response token of each example, in input order; ``nan`` for an example whose
        response was truncated away entirely.
    per_example_tokens : list[int]
        Response tokens scored per example, in input order (weights for a paired comparison).
    """

    loss: float
    perplexity: float
    n_tokens: int
    per_example: list[float]
    per_example_tokens: list[int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``nan`` per-example losses become ``None``)."""
        out = asdict(self)
        out["per_example"] = [None if math.isnan(x) else x for x in self.per_example]
        return out


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode (no dropout) under ``torch.no_grad()``, restoring its mode after."""
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where input tensors must go)."""
    return next(model.parameters()).device


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked or never read, so either works)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pid)


def heldout_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    batching: str = "padded",
) -> LossResult:
    """Mean per-token cross-entropy of ``model`` on the response tokens of ``examples``.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (``transformers`` model or ``PeftModel``); put in eval mode while scoring.
    tokenizer : Any
        Its tokenizer (needs an eos token).
    examples : Sequence[Example]
        Held-out examples; the loss covers each response and its eos, as in training.
    max_length : int
        Truncation length of prompt + response, as in training.
    batch_size : int
        Examples per forward pass (length-sorted; the result does not depend on it beyond float noise).
    progress : bool
        Show a tqdm progress bar.
    batching : str
        "padded" (the default: batches are length-sorted, so little padding is computed) or "packed"
        (the rows side by side); the same losses up to float rounding (``florist.data.tokenize``).

    Returns
    -------
    LossResult
        Token-weighted mean loss, perplexity, token count and per-example losses in input order.
    """
    if not examples:
        raise ConfigError("heldout_loss needs at least one example, got none")
    if batch_size < 1 or max_length < 2:
        raise ConfigError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    encoded = [encode(ex, tokenizer, max_length) for ex in examples]
    sums = torch.zeros(len(encoded), dtype=torch.float64)
    counts = torch.zeros(len(encoded), dtype=torch.long)
    off = (not progress) or None  # None: drawn on a terminal only, never into a log file
    bar = tqdm(total=len(encoded), desc="held-out loss", unit="ex", disable=off)
    with evaluating(model), packed_attention(model), bar:
        for rows in length_sorted_batches(encoded, batch_size):
            batch = make_batch([encoded[i] for i in rows], pad_id(tokenizer), batching)
            sums[rows], counts[rows] = token_loss_sums(model, batch)
            bar.update(len(rows))
    return loss_result(sums, counts)


def token_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sum of next-token cross-entropy over labelled positions, and the count of those
    positions, each (B,), for a padded or packed ``batch``.

    Only the positions that predict a label are projected onto the vocabulary
    (``florist.client.lm_loss.labelled_logits``), which skips the lm_head on prompt and padding tokens.
    """
    device = model_device(model)
    on_device = {k: v.to(device) for k, v in batch.items()}
    logits, targets, keep = labelled_logits(model, on_device)  # (K, V), (K,), (B, T)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    owner = example_of_position(batch)[keep.cpu()]  # (K,) the example each scored position belongs to
    n = len(batch["cu_seq_lens"]) - 1 if "cu_seq_lens" in batch else keep.shape[0]  # examples
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, losses.double().cpu())
    counts = torch.bincount(owner, minlength=n)
    return sums, counts


def loss_result(sums: torch.Tensor, counts: torch.Tensor) -> LossResult:
    """Token-weighted mean loss from per-example loss sums (N,) and token counts (N,)."""
    total = int(counts.sum())
    if total == 0:
        raise ConfigError("no response token survived truncation; raise max_length")
    loss = float(sums.sum()) / total
    per_example = [float(s) / int(c) if c > 0 else math.nan for s, c in zip(sums, counts, strict=True)]
    return LossResult(
        loss=loss,
        perplexity=math.exp(loss),
        n_tokens=total,
        per_example=per_example,
        per_example_tokens=[int(c) for c in counts],
    )
