"""Turn examples into token ids and loss labels, and batches into padded tensors.

    input_ids = tokens(prompt(ex)) + tokens(response) + [eos]          at most max_length
    labels    = -100 on the prompt (unless train_on_inputs), the ids on response and eos

The prompt is tokenised on its own and the response appended, so the boundary never moves with
the tokenizer's merges across it. A row longer than ``max_length`` is truncated, never dropped:
with ``train_on_inputs`` at its end, as the paper's code does (``cutoff_len``); with labels on the
response only, the response keeps at least half of ``max_length`` (all of it if it fits) and the
prompt gives up its middle (usually the context), keeping its head (the instruction) and its tail
(the "### Response:" cue), so every row still trains on response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from florist.data.prompt import prompt
from florist.data.records import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with a bos token in front when the tokenizer asks for one."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id:
        return [tokenizer.bos_token_id, *ids]
    return ids


def encode(ex: Example, tokenizer: Any, max_length: int, train_on_inputs: bool = False) -> Encoded:
    """Token ids and labels of one example (loss on the response tokens only by default)."""
    p = prompt_token_ids(tokenizer, prompt(ex))
    r = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if train_on_inputs:
        ids = (p + r)[:max_length]
        return Encoded(input_ids=ids, labels=ids[:])
    p, r = fit(p, r, max_length)
    return Encoded(input_ids=p + r, labels=[IGNORE] * len(p) + r)


def fit(p: list[int], r: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt and response ids cut to ``max_length`` together (see the module docstring)."""
    if len(p) + len(r) <= max_length:
        return p, r
    keep_r = min(len(r), max(max_length - len(p), max_length - max_length // 2))
    budget = max_length - keep_r  # prompt tokens left
    head = budget // 2
    return p[:head] + p[len(p) - (budget - head) :], r[:keep_r]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask``, ``labels``, each (B, T)."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_sorted_batches(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (for evaluation: less padding, deterministic order)."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
