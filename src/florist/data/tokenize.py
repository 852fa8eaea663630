"""Turn examples into token ids and loss labels, and batches into padded or packed tensors.

    input_ids = tokens(prompt(ex)) + tokens(response) + [eos]          at most max_length
    labels    = -100 on the prompt (unless train_on_inputs), the ids on response and eos

A batch of B examples of lengths L_1..L_B becomes tensors in one of two layouts (``BATCHINGS``):

    padded   (B, T), T = max L_i: right-padded rows and an ``attention_mask``; B x T positions computed
    packed   (1, N), N = sum L_i: the rows side by side, ``position_ids`` restarting at 0 per example
             and ``cu_seq_lens`` (B + 1,) the example boundaries; attention never crosses one
             (``florist.client.packed_attention``), and each example's first label is -100 so no
             position predicts across a boundary. Only real tokens are computed.

Both give every example the same loss and gradient up to float rounding (tests/unit/test_packing.py).

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

from florist.config.training import BATCHINGS
from florist.data.prompt import chat_prompt, prompt
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


def prompt_ids(tokenizer: Any, ex: Example) -> list[int]:
    """The prompt's token ids in the example's template: Alpaca (a bos in front where the tokenizer
    asks for one) or the model's chat template (its own special tokens, nothing added)."""
    if ex.template == "chat":
        ids: list[int] = tokenizer(chat_prompt(ex, tokenizer), add_special_tokens=False)["input_ids"]
        return ids
    return prompt_token_ids(tokenizer, prompt(ex))


def encode(ex: Example, tokenizer: Any, max_length: int, train_on_inputs: bool = False) -> Encoded:
    """Token ids and labels of one example (loss on the response tokens only by default)."""
    p = prompt_ids(tokenizer, ex)
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


def pack(batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """The examples side by side in one row: ``input_ids``, ``position_ids``, ``labels`` (each (1, N))
    and ``cu_seq_lens`` ((B + 1,) int32, the offsets where each example starts, then N)."""
    lengths = torch.tensor([len(e) for e in batch])  # (B,)
    cu = torch.zeros(len(batch) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ids = torch.tensor([t for e in batch for t in e.input_ids]).unsqueeze(0)  # (1, N)
    labels = torch.tensor([t for e in batch for t in e.labels]).unsqueeze(0)  # (1, N)
    labels[0, cu[:-1].long()] = IGNORE  # nothing before an example's first token may predict it
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)  # (N,) offset of each token's example
    positions = (torch.arange(int(cu[-1])) - starts).unsqueeze(0)  # (1, N)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "cu_seq_lens": cu}


def make_batch(batch: Sequence[Encoded], pad_id: int, batching: str) -> dict[str, torch.Tensor]:
    """``collate`` (padded) or ``pack`` (packed) ``batch``, by ``batching`` (one of ``BATCHINGS``)."""
    if batching == "packed":
        return pack(batch)
    if batching == "padded":
        return collate(batch, pad_id)
    raise ValueError(f"batching must be one of {list(BATCHINGS)}, got {batching!r}")


def computed_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions a forward pass over ``batch`` computes (real tokens plus any padding)."""
    return int(batch["input_ids"].numel())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in ``batch``, in either layout."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def example_of_position(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, N) or (B, T): the index of the example each position belongs to, in either layout."""
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"].long()
        return torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1]).unsqueeze(0)
    rows, width = batch["input_ids"].shape
    return torch.arange(rows).unsqueeze(1).expand(rows, width)


def length_sorted_batches(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (for evaluation: less padding, deterministic order)."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
