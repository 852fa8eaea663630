"""Exact-match accuracy of greedy answers, overall and per category (the skills set's metric).

    answer     = first line of greedy_decode(prompt(ex))     prompt: the template training uses
    correct    = normalize(answer) == normalize(ex.response)
    accuracy   = mean(correct)                                over all examples (micro)
    per_category[c] = mean(correct over the examples of category c)

Prompts are tokenised exactly as ``florist.data.tokenize.encode`` tokenises them for training,
left-padded into length-sorted batches and decoded greedily (no sampling: the same model gives the
same answers). Works for a plain ``transformers`` causal LM and for a peft ``PeftModel``.

    from florist.eval.exact_match import exact_match
    result = exact_match(model, tokenizer, test_examples)
    print(result.accuracy, result.per_category)
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from florist.data.records import Example
from florist.data.tokenize import prompt_ids as encoded_prompt
from florist.errors import ConfigError
from florist.eval.heldout import evaluating

END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "</s>")
QUOTES = "\"'` "
TRAILING = ".,;:!?" + QUOTES


@dataclass(frozen=True)
class Prediction:
    category: str
    instruction: str
    context: str
    reference: str
    answer: str
    correct: bool


@dataclass(frozen=True)
class EMResult:
    """Exact match of one model on one list of examples.

    Parameters
    ----------
    accuracy : float
        Fraction of all examples answered exactly (micro average).
    per_category : dict[str, float]
        Fraction answered exactly within each category, categories sorted by name.
    n : int
        Number of examples scored.
    n_per_category : dict[str, int]
        Number of examples of each category.
    predictions : list[Prediction]
        Every example's reference, raw answer and verdict, in the order of the examples.
    """

    accuracy: float
    per_category: dict[str, float]
    n: int
    n_per_category: dict[str, int]
    predictions: list[Prediction]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (predictions as a list of dicts)."""
        return asdict(self)


def normalize(text: str) -> str:
    """Lowercase, drop end-of-turn markers, collapse whitespace, strip trailing punctuation, strip quotes.

    ``"  Paris.<|im_end|>"`` and ``"paris"`` normalise alike; ``"7, 19, 42"`` keeps its inner commas.
    """
    for marker in END_OF_TURN:
        text = text.replace(marker, " ")
    text = re.sub(r"\s+", " ", text).strip().lower()
    return text.rstrip(TRAILING).lstrip(QUOTES)


def score(examples: Sequence[Example], answers: Sequence[str]) -> EMResult:
    """Compare ``answers[i]`` with ``examples[i].response``, both through ``normalize``."""
    if len(examples) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    preds = [
        Prediction(
            ex.category,
            ex.instruction,
            ex.context,
            ex.response,
            ans,
            normalize(ans) == normalize(ex.response),
        )
        for ex, ans in zip(examples, answers, strict=True)
    ]
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for p in preds:
        by_cat[p.category].append(p.correct)
    return EMResult(
        accuracy=sum(p.correct for p in preds) / len(preds) if preds else 0.0,
        per_category={c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
        n=len(preds),
        n_per_category={c: len(v) for c, v in sorted(by_cat.items())},
        predictions=preds,
    )


def prompt_ids(ex: Example, tokenizer: Any) -> list[int]:
    """Token ids of the prompt exactly as ``florist.data.tokenize.encode`` builds them (bos included)."""
    return encoded_prompt(tokenizer, ex)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, each (B, T), padded on the left so every row ends together."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def first_line(text: str) -> str:
    """The answer proper: the text before the first newline."""
    return text.split("\n", 1)[0]


@torch.no_grad()
def _generate_batch(model: Any, tokenizer: Any, rows: list[list[int]], max_new_tokens: int) -> list[str]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(rows, pad_id)  # (B, T)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        stop_strings=["\n"],  # a row stops at its first newline, the others go on
        tokenizer=tokenizer,
    )  # (B, T + new)
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [first_line(t) for t in texts]


def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy answers (first line, special tokens dropped), in the order of ``examples``.

    Examples are batched by prompt length (less padding); the model is put in inference mode for
    the call and given back in the mode it came in.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    rows = [prompt_ids(ex, tokenizer) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    answers = [""] * len(rows)
    with evaluating(model):
        off = (not progress) or None  # None: drawn on a terminal only, never into a log file
        for batch in tqdm(batches, desc="exact match", disable=off, leave=False):
            texts = _generate_batch(model, tokenizer, [rows[i] for i in batch], max_new_tokens)
            for i, text in zip(batch, texts, strict=True):
                answers[i] = text
    return answers


def exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
) -> EMResult:
    """Greedy-decode every example's prompt and score it against the response (see the module docstring)."""
    answers = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, progress)
    return score(examples, answers)
