"""MMLU by log-likelihood of the answer letter, with the Alpaca prompt used in training.

    prompt(item) = alpaca_prompt(instruction, input="Qusetion: ... Options: A. w, B. x, C. y, D. z")
                   + "The answer is:"
    prediction   = argmax over L in {A, B, C, D} of logit(next token = " L")    (last position only)

The prompts share a long prefix (the Alpaca header, the instruction, "Qusetion:"): its key/value
cache is computed once and repeated for each batch, and only the question suffixes are run, right
padded, with the logits taken at each row's last real token. Results equal a full forward of each
prompt up to float rounding.

    from florist.client.model import load_model
    model, tokenizer = load_model()
    items = subset(load_mmlu("../shared/data/mmlu/mmlu_1444.json"), 200, seed=0)
    print(score_mmlu(model, tokenizer, items).to_dict())
"""

from __future__ import annotations

import copy
import logging
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from florist.data.loaders import read_rows
from florist.data.prompt import prompt
from florist.data.records import Example
from florist.data.tokenize import prompt_token_ids
from florist.errors import ConfigError
from florist.eval.heldout import evaluating, model_device, pad_id

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
ANSWER_CUE = "The answer is:"
QUESTION_PREFIXES = ("Qusetion: ", "Question: ")  # the data set's typo, and the spelling it meant
OPTIONS_MARKER = " Options: "
ANSWER_RE = re.compile(r"The answer is:\s*([ABCD])\.(?:\s(.*))?\Z", re.DOTALL)


@dataclass(frozen=True)
class MmluItem:
    """One multiple-choice question."""

    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"
    subject: str
    instruction: str

    @property
    def input_text(self) -> str:
        """The ``input`` field as the data set writes it ("Qusetion" sic); round-trips the shared file."""
        a, b, c, d = self.options
        return f"{QUESTION_PREFIXES[0]}{self.question}{OPTIONS_MARKER}A. {a}, B. {b}, C. {c}, D. {d}"


@dataclass(frozen=True)
class MmluResult:
    """Accuracy of one model on a list of MMLU items.

    Attributes
    ----------
    micro : float
        Fraction of items answered correctly.
    macro : float
        Mean over subjects of the per-subject accuracy.
    per_subject : dict[str, float]
        Accuracy per subject, subjects sorted by name.
    n : int
        Number of items.
    predictions : list[str]
        Predicted letter per item, in input order.
    correct : list[bool]
        Whether each prediction is right, in input order (for paired comparisons between models).
    """

    micro: float
    macro: float
    per_subject: dict[str, float]
    n: int
    predictions: list[str]
    correct: list[bool]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "micro": self.micro,
            "macro": self.macro,
            "n": self.n,
            "per_subject": dict(self.per_subject),
            "predictions": list(self.predictions),
            "correct": list(self.correct),
        }


# --------------------------------------------------------------------------- loading


def load_mmlu(path: str | Path) -> list[MmluItem]:
    """Items of a FLoRA-style MMLU file: a JSON array or JSON Lines of {instruction, input, output, class}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"MMLU file {str(path)!r} does not exist")
    return [parse_row(row, f"{path} row {i}") for i, row in enumerate(read_rows(path))]


def parse_row(row: Mapping[str, Any], where: str = "row") -> MmluItem:
    """Parse one raw row; ``where`` names it in errors (``ConfigError``)."""
    fields = {}
    for key in ("instruction", "input", "output", "class"):
        value = row.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {key!r} must be a string, got {value!r}")
        fields[key] = value
    question, options = _split_input(fields["input"], where)
    answer = _answer_letter(fields["output"], options, where)
    return MmluItem(question, options, answer, fields["class"], fields["instruction"])


def _split_input(text: str, where: str) -> tuple[str, tuple[str, str, str, str]]:
    """``"Qusetion: q Options: A. a, B. b, C. c, D. d"`` -> ``(q, (a, b, c, d))``; options may hold ", "."""
    prefix = next((p for p in QUESTION_PREFIXES if text.startswith(p)), None)
    if prefix is None:
        raise ConfigError(f"{where}: input must start with {QUESTION_PREFIXES[0]!r}, got {text[:40]!r}")
    question, sep, rest = text[len(prefix) :].rpartition(OPTIONS_MARKER)
    if not sep:
        raise ConfigError(f"{where}: input has no {OPTIONS_MARKER.strip()!r} marker: {text[:80]!r}")
    if not rest.startswith("A. "):
        raise ConfigError(f"{where}: options must start with 'A. ', got {rest[:40]!r}")
    starts, ends = [0], [3]  # where each marker begins and ends in `rest`
    for letter in LETTERS[1:]:
        marker = f", {letter}. "
        at = rest.find(marker, ends[-1])
        if at < 0:
            raise ConfigError(f"{where}: no option marker {marker!r} after option {LETTERS[len(starts) - 1]}")
        starts.append(at)
        ends.append(at + len(marker))
    bounds = [*starts[1:], len(rest)]
    a, b, c, d = (rest[e:s] for e, s in zip(ends, bounds, strict=True))
    return question, (a, b, c, d)


def _answer_letter(output: str, options: tuple[str, str, str, str], where: str) -> str:
    """Letter of ``"The answer is: C. text"``, checking that ``text`` (if any) is option C."""
    match = ANSWER_RE.fullmatch(output.strip())
    if match is None:
        raise ConfigError(f"{where}: output must read 'The answer is: <A-D>. <option>', got {output[:60]!r}")
    letter, text = match.group(1), match.group(2)
    chosen = options[LETTERS.index(letter)]
    if text is not None and text.strip() != chosen.strip():
        raise ConfigError(
            f"{where}: answer text {text[:40]!r} is not option {letter} {chosen[:40]!r} "
            "(an option containing ', X. ' may have been split wrongly)"
        )
    return letter


def subset(items: Sequence[MmluItem], n: int | None, seed: int = 0) -> list[MmluItem]:
    """A deterministic subject-stratified sample of ``n`` items (all of them for ``n=None``), in file order.

    Each subject gets ``n * size / total`` items rounded down, and the items left over go to the
    subjects with the largest remainders (ties broken by a draw from ``seed``).
    """
    if n is None:
        return list(items)
    if not 0 <= n <= len(items):
        raise ConfigError(f"subset size n must be in [0, {len(items)}], got {n}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.subject].append(i)
    rng = random.Random(seed)
    quota = _quotas({s: len(groups[s]) for s in sorted(groups)}, n, rng)
    chosen: list[int] = []
    for s in sorted(groups):
        chosen += rng.sample(groups[s], quota[s])
    return [items[i] for i in sorted(chosen)]


def _quotas(sizes: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """Largest-remainder apportionment of ``n`` over groups of the given sizes."""
    total = sum(sizes.values())
    exact = {s: n * k / total for s, k in sizes.items()}
    quota = {s: int(x) for s, x in exact.items()}
    tiebreak = {s: rng.random() for s in sizes}
    by_remainder = sorted(sizes, key=lambda s: (quota[s] - exact[s], tiebreak[s]))
    for s in by_remainder[: n - sum(quota.values())]:
        quota[s] += 1
    return quota


# --------------------------------------------------------------------------- scoring


def mmlu_prompt(item: MmluItem) -> str:
    """The Alpaca training prompt of the item, followed by ``"The answer is:"``."""
    ex = Example(instruction=item.instruction, context=item.input_text, response="")
    return prompt(ex) + ANSWER_CUE


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens " A", " B", " C", " D".

    When a letter is more than one token, the first is scored (a warning is logged); when the four
    first tokens are not distinct the letters cannot be told apart and ``ConfigError`` is raised.
    """
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
    if any(len(t) != 1 for t in ids):
        log.warning("answer letters are not single tokens (%s); scoring their first token", ids)
    first = [t[0] for t in ids if t]
    if len(set(first)) != len(LETTERS):
        raise ConfigError(f"the tokenizer does not give ' A'..' D' distinct first tokens: {ids}")
    return first


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with a bos token exactly when ``florist.data.tokenize.encode`` adds one."""
    return prompt_token_ids(tokenizer, text)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token of every sequence outside it."""
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for t in range(limit):
        if any(s[t] != first[t] for s in seqs):
            return t
    return max(limit, 0)


def letter_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[MmluItem],
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Next-token logits of " A".." D" after each item's prompt, (N, 4) float32 on the CPU, input order."""
    if not items or batch_size < 1:
        raise ConfigError(f"need at least one item and batch_size >= 1, got {len(items)} and {batch_size}")
    letters = torch.tensor(letter_token_ids(tokenizer))
    ids = [prompt_ids(tokenizer, mmlu_prompt(item)) for item in items]
    p = common_prefix_len(ids)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]) - p, i))  # less padding per batch
    out = torch.empty(len(ids), len(LETTERS))
    off = (not progress) or None  # None: drawn on a terminal only, never into a log file
    bar = tqdm(total=len(ids), desc="MMLU", unit="q", disable=off)
    with evaluating(model), bar:
        prefix = _prefix_cache(model, ids[0][:p])
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits = _last_logits(model, [ids[i][p:] for i in rows], prefix, pad_id(tokenizer))  # (B, V)
            out[rows] = logits[:, letters.to(logits.device)].float().cpu()
            bar.update(len(rows))
    return out


def _prefix_cache(model: torch.nn.Module, prefix: list[int]) -> Any:
    """The key/value cache after the shared prefix (batch 1), or ``None`` for an empty prefix."""
    if not prefix:
        return None
    ids = torch.tensor([prefix], device=model_device(model))  # (1, P)
    return model(input_ids=ids, use_cache=True, logits_to_keep=1).cache


def _last_logits(model: torch.nn.Module, suffixes: list[list[int]], prefix: Any, pad: int) -> torch.Tensor:
    """Vocabulary logits at the last real token of each right-padded suffix, after the cached prefix.

    Right padding needs no attention mask: causal attention never lets a real token see the pads
    after it, and positions continue from the prefix length.
    """
    device = model_device(model)
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad, dtype=torch.long)  # (B, T)
    for i, s in enumerate(suffixes):
        ids[i, : len(s)] = torch.tensor(s)
    last = torch.tensor([[len(s) - 1] for s in suffixes], device=device)  # (B, 1)
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(suffixes))
    out = model(input_ids=ids.to(device), cache=cache, use_cache=cache is not None, logits_to_keep=last)
    logits: torch.Tensor = out.logits  # (B, 1, V)
    return logits[:, 0, :]


def score_mmlu(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[MmluItem],
    batch_size: int = 8,
    progress: bool = True,
) -> MmluResult:
    """Accuracy of ``model`` on ``items`` by comparing the next-token logits of " A", " B", " C", " D".

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (``transformers`` model or ``PeftModel``); put in eval mode while scoring.
    tokenizer : Any
        Its tokenizer. If a letter is not a single token, its first token is scored.
    items : Sequence[MmluItem]
        The questions (e.g. ``subset(load_mmlu(path), 200, seed=0)``).
    batch_size : int
        Questions per forward pass; predictions do not depend on it.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    MmluResult
        Micro and macro accuracy, accuracy per subject and the predicted letter per item.
    """
    logits = letter_logits(model, tokenizer, items, batch_size, progress)  # (N, 4)
    predictions = [LETTERS[int(k)] for k in logits.argmax(dim=1)]
    return mmlu_result(items, predictions)


def mmlu_result(items: Sequence[MmluItem], predictions: Sequence[str]) -> MmluResult:
    """Micro, macro and per-subject accuracy of predicted letters."""
    if len(items) != len(predictions) or not items:
        raise ConfigError(f"need one prediction per item, got {len(predictions)} for {len(items)} items")
    correct = [p == item.answer for item, p in zip(items, predictions, strict=True)]
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, correct, strict=True):
        hits[item.subject].append(ok)
    per_subject = {s: sum(hits[s]) / len(hits[s]) for s in sorted(hits)}
    return MmluResult(
        micro=sum(correct) / len(correct),
        macro=sum(per_subject.values()) / len(per_subject),
        per_subject=per_subject,
        n=len(items),
        predictions=list(predictions),
        correct=correct,
    )
