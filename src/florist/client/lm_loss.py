"""Next-token cross-entropy on the labelled positions only, shared by training and held-out scoring.

    targets   = labels[:, 1:]                                  (B, T-1): the token each position predicts
    keep      = positions whose target is not IGNORE           (B, T) boolean, last column False
    logits    = lm_head(hidden[keep])                          (K, V), K = keep.sum()
    loss_i    = cross_entropy(logits_i, target_i)               (K,)   in float32

The vocabulary projection (49k columns for SmolLM2) and its softmax run on the K labelled positions
only, not on the prompt and padding: the same loss as transformers' ``labels=`` path, for less work.
A batch is padded ((B, T) with ``attention_mask``) or packed ((1, N) with ``position_ids`` and
``cu_seq_lens``, ``florist.data.tokenize.pack``; the model must be inside
``florist.client.packed_attention.packed_attention``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from florist.client.packed_attention import packed_forward_kwargs
from florist.data.tokenize import IGNORE


def labelled_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits (K, V), targets (K,), keep (B, T))`` for the labelled positions of ``batch``.

    ``batch`` holds ``input_ids``, ``labels`` and either ``attention_mask`` (padded, each (B, T)) or
    ``position_ids`` and ``cu_seq_lens`` (packed, (1, N)), on the model's device.
    """
    labels = batch["labels"]  # (B, T)
    targets = labels[:, 1:]  # (B, T-1)
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    keep[:, :-1] = targets != IGNORE
    if "cu_seq_lens" in batch:
        out = model(**packed_forward_kwargs(batch), logits_to_keep=keep)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return out.logits, targets[targets != IGNORE], keep  # (K, V), (K,), (B, T)


def mean_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of ``batch`` (a scalar)."""
    logits, targets, _ = labelled_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over examples of each example's mean labelled-token loss (a padded batch): DP-SGD's
    loss, where one example's gradient must not depend on the others' lengths."""
    logits, targets, keep = labelled_logits(model, batch)  # (K, V), (K,), (B, T)
    token = F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    rows = keep.nonzero()[:, 0]  # the example of each labelled position
    b = keep.shape[0]
    total = torch.zeros(b, dtype=token.dtype, device=token.device).index_add(0, rows, token)
    count = torch.zeros(b, dtype=token.dtype, device=token.device).index_add(0, rows, torch.ones_like(token))
    return (total / count.clamp(min=1)).mean()
