"""MMLU parsing and scoring, held-out loss: a tiny random Llama, a word-level tokenizer, a hint-reading stub."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, PreTrainedTokenizerFast

from florist.data.prompt import prompt
from florist.data.records import Example
from florist.data.tokenize import IGNORE, encode
from florist.errors import ConfigError
from florist.eval.heldout import heldout_loss
from florist.eval.mmlu import (
    LETTERS,
    MmluItem,
    letter_logits,
    letter_token_ids,
    load_mmlu,
    mmlu_prompt,
    mmlu_result,
    parse_row,
    prompt_ids,
    score_mmlu,
    subset,
)
from tests.helpers import SHARED_DATA
from tests.peft_helpers import tiny_llama

INSTRUCTION = "Please answer the following multiple-choice question honestly."
SPECIALS = ["<pad>", "<unk>", "</s>"]


def row(question: str, options: Sequence[str], answer: str, subject: str = "s1") -> dict[str, str]:
    a, b, c, d = options
    text = dict(zip(LETTERS, options, strict=True))[answer]
    return {
        "instruction": INSTRUCTION,
        "input": f"Qusetion: {question} Options: A. {a}, B. {b}, C. {c}, D. {d}",
        "output": f"The answer is: {answer}. {text}",
        "class": subject,
    }


def item(question: str, answer: str, subject: str, options: Sequence[str] = ("w", "x", "y", "z")) -> MmluItem:
    return parse_row(row(question, options, answer, subject))


def word_tokenizer(texts: Sequence[str], isolate_spaces: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts`` (split on whitespace and punctuation)."""
    words = pre_tokenizers.Whitespace()
    vocab = [*SPECIALS, *sorted({w for t in texts for w, _ in words.pre_tokenize_str(t)})]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    if isolate_spaces:  # " A" becomes [" ", "A"]: the letters share their first token
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    else:
        tok.pre_tokenizer = words
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


# --------------------------------------------------------------------------- parsing


def test_tricky_rows_parse(tmp_path: Path) -> None:
    rows = [
        row("Which is a pair?", ["red, green", "blue", "C. sharp", "none, of, these"], "A", "music"),
        row("Spelled right?", ["yes", "no", "maybe", "so"], "B"),
        row("Pick from the Options: listed\nbelow.", ["1, 2", "3", "4", "5, 6, 7"], "D", "math"),
    ]
    rows[1]["input"] = "Question: Spelled right? Options: A. yes, B. no, C. maybe, D. so"
    (tmp_path / "mmlu.json").write_text(json.dumps(rows))
    a, b, c = load_mmlu(tmp_path / "mmlu.json")
    assert a.options == ("red, green", "blue", "C. sharp", "none, of, these")
    assert (a.question, a.answer, a.subject, a.instruction) == ("Which is a pair?", "A", "music", INSTRUCTION)
    assert (b.question, b.answer, b.options[3]) == ("Spelled right?", "B", "so")
    assert c.question == "Pick from the Options: listed\nbelow." and c.options == (
        "1, 2",
        "3",
        "4",
        "5, 6, 7",
    )
    assert a.input_text == rows[0]["input"] and c.input_text == rows[2]["input"]
    assert b.input_text.startswith("Qusetion: Spelled right?")  # the data set's spelling


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": "Q: x Options: A. a, B. b, C. c, D. d"}, r"row 1: input must start with 'Qusetion: '"),
        ({"input": "Qusetion: x A. a, B. b, C. c, D. d"}, r"row 1: input has no 'Options:' marker"),
        (
            {"input": "Qusetion: x Options: A. a, B. b, D. d"},
            r"row 1: no option marker ', C\. ' after option B",
        ),
        ({"input": "Qusetion: x Options: a, B. b, C. c, D. d"}, r"row 1: options must start with 'A\. '"),
        ({"output": "The answer is: E. e"}, r"row 1: output must read 'The answer is: <A-D>\. <option>'"),
        ({"output": "The answer is: B. c"}, r"row 1: answer text 'c' is not option B 'b'"),
        ({"class": None}, r"row 1: field 'class' must be a string, got None"),
    ],
)
def test_bad_rows_name_the_row_and_the_fault(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    good = row("x", ["a", "b", "c", "d"], "C")
    (tmp_path / "bad.json").write_text(json.dumps([good, {**good, **change}]))
    with pytest.raises(ConfigError, match=r"bad\.json " + message):
        load_mmlu(tmp_path / "bad.json")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.json' does not exist"):
        load_mmlu(tmp_path / "nope.json")


@pytest.mark.skipif(not (SHARED_DATA / "mmlu").is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_shared_mmlu_file_parses_and_round_trips() -> None:
    path = SHARED_DATA / "mmlu" / "mmlu_1444.json"
    items, rows = load_mmlu(path), json.loads(path.read_text())
    assert len(items) == 1444 and len({i.subject for i in items}) == 57
    assert [i.input_text for i in items] == [r["input"] for r in rows]


# --------------------------------------------------------------------------- subsets


def test_subset_is_seeded_stratified_and_in_file_order() -> None:
    items = [item(f"q{i}", "A", s) for s, k in [("a", 50), ("b", 30), ("c", 15), ("d", 5)] for i in range(k)]
    picked = subset(items, 20, seed=3)
    assert picked == subset(items, 20, seed=3) != subset(items, 20, seed=4)
    assert Counter(i.subject for i in picked) == {"a": 10, "b": 6, "c": 3, "d": 1}
    assert [items.index(i) for i in picked] == sorted(items.index(i) for i in picked)
    uneven = Counter(i.subject for i in subset(items, 7, seed=0))  # exact quotas 3.5, 2.1, 1.05, 0.35
    assert uneven == {"a": 4, "b": 2, "c": 1}  # the one left over goes to the largest remainder
    assert subset(items, None, seed=0) == items
    with pytest.raises(ConfigError, match=r"subset size n must be in \[0, 100\], got 101"):
        subset(items, 101, seed=0)


# --------------------------------------------------------------------------- accuracy


def test_micro_and_macro_accuracy() -> None:
    items = [item("a", "A", "s1"), item("b", "B", "s1"), item("c", "C", "s1"), item("d", "D", "s2")]
    result = mmlu_result(items, ["A", "B", "D", "A"])
    assert result.micro == 0.5 and result.macro == pytest.approx((2 / 3 + 0) / 2)
    assert result.per_subject == {"s1": pytest.approx(2 / 3), "s2": 0.0}
    assert result.correct == [True, True, False, False] and result.n == 4
    assert json.loads(json.dumps(result.to_dict()))["predictions"] == ["A", "B", "D", "A"]
    with pytest.raises(ConfigError, match="need one prediction per item, got 3 for 4 items"):
        mmlu_result(items, ["A", "B", "C"])


class HintModel(torch.nn.Module):
    """Answers the letter named by a ``hintX`` word of the prompt, and only at a ``:`` token.

    The cache stores the token ids it has seen (as keys), so the hint is found whether it sits in
    the cached prefix or in the batch; logits are zero elsewhere, so reading the wrong position
    (a pad, say) answers "A".
    """

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.letters = letter_token_ids(tokenizer)
        self.hints = torch.tensor([tokenizer.convert_tokens_to_ids(f"hint{x}") for x in LETTERS])
        self.colon = tokenizer.convert_tokens_to_ids(":")
        self.vocab = len(tokenizer)

    def forward(
        self, input_ids: torch.Tensor, cache: Any = None, use_cache: bool = False, logits_to_keep: Any = 0
    ) -> SimpleNamespace:
        seen = input_ids.double()[:, None, :, None]  # (B, 1, T, 1)
        cache = DynamicCache() if cache is None and use_cache else cache
        if cache is not None:
            seen, _ = cache.update(seen, seen, 0)  # (B, 1, P + T, 1)
        hint = (seen[:, 0, :, 0].long()[:, :, None] == self.hints).any(dim=1).double()  # (B, 4)
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=torch.float64)  # (B, T, V)
        logits[:, :, self.letters] = (input_ids == self.colon)[:, :, None] * hint[:, None, :]
        if isinstance(logits_to_keep, torch.Tensor):  # (B, K) positions
            logits = torch.take_along_dim(logits, logits_to_keep[..., None], dim=1)
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=cache)


HINTED = [  # (question, hint, answer, subject): the stub gets 2 of 3 right in s1 and 0 of 1 in s2
    ("first hintB", "B", "s1"),
    ("a much longer second question hintC with more words", "C", "s1"),
    ("third hintD", "A", "s1"),
    ("fourth hintB here", "D", "s2"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_scorer_reads_the_last_real_position(batch_size: int) -> None:
    items = [item(q, a, s) for q, a, s in HINTED]
    tok = word_tokenizer([*(mmlu_prompt(i) for i in items), "A B C D hintA hintB hintC hintD"])
    result = score_mmlu(HintModel(tok), tok, items, batch_size=batch_size, progress=False)
    assert result.predictions == ["B", "C", "D", "B"]
    assert (result.micro, result.macro) == (0.5, pytest.approx(1 / 3))


def _items_and_tokenizer() -> tuple[list[MmluItem], PreTrainedTokenizerFast]:
    items = [
        item("why is the sky blue", "B", "physics", ("light", "dust, mostly", "sea", "paint")),
        item("two plus two", "D", "math", ("one", "two", "three", "four")),
        item("the longest question of all the questions here by far", "A", "math"),
        item("short", "C", "physics"),
        item("is water wet", "A", "physics", ("yes", "no", "maybe", "light")),
    ]
    return items, word_tokenizer([mmlu_prompt(i) for i in items])


def _reference_letter_logits(model: Any, tokenizer: Any, items: Sequence[MmluItem]) -> torch.Tensor:
    """One full forward per prompt, no cache, no padding: logits of the letters at the last token."""
    letters = letter_token_ids(tokenizer)
    with torch.no_grad():
        rows = [model(torch.tensor([prompt_ids(tokenizer, mmlu_prompt(i))])).logits[0, -1] for i in items]
    return torch.stack(rows)[:, letters]  # (N, 4)


def test_prefix_cache_and_padding_match_a_full_forward() -> None:
    items, tok = _items_and_tokenizer()
    model = tiny_llama(seed=2, vocab_size=len(tok), initializer_range=0.2)  # logits that differ by item
    want = _reference_letter_logits(model, tok, items)
    assert len(set(want.argmax(dim=1).tolist())) > 1  # the check below is not vacuous
    for batch_size in (1, 3, 8):
        got = letter_logits(model, tok, items, batch_size=batch_size, progress=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_model_is_scored_in_eval_mode_and_left_as_it_was() -> None:
    items, tok = _items_and_tokenizer()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    model = get_peft_model(tiny_llama(seed=2, vocab_size=len(tok)), config)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)  # non-zero B, so the adapter changes the logits
    model.train()
    got = [letter_logits(model, tok, items, batch_size=2, progress=False) for _ in range(2)]
    assert model.training
    want = _reference_letter_logits(model.eval(), tok, items)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        base = _reference_letter_logits(model, tok, items)
    assert not torch.allclose(want, base, atol=1e-3)


def test_letters_that_share_a_first_token_are_refused() -> None:
    tok = word_tokenizer(["A B C D"], isolate_spaces=True)
    with pytest.raises(ConfigError, match="does not give ' A'..' D' distinct first tokens"):
        letter_token_ids(tok)


# --------------------------------------------------------------------------- held-out loss

EXAMPLES = [
    Example("Name a colour.", "Red is a colour."),
    Example("Sum the numbers.", "The sum is five, not six.", context="two and three"),
    Example("Say hi.", "Hi."),
    Example("Describe the sea in many words.", "The sea is wide and deep and blue and cold and old."),
]


def _loss_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer([prompt(ex) + ex.response for ex in EXAMPLES])


def test_heldout_loss_equals_a_hand_computed_cross_entropy() -> None:
    tok = _loss_tokenizer()
    model = tiny_llama(seed=3, vocab_size=len(tok))
    sums, counts = [], []
    with torch.no_grad():
        for ex in EXAMPLES:
            enc = encode(ex, tok, max_length=64)
            logits = model(torch.tensor([enc.input_ids])).logits[0]  # (T, V)
            labels = torch.tensor(enc.labels[1:])  # (T-1,)
            sums.append(float(F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE, reduction="sum")))
            counts.append(int((labels != IGNORE).sum()))
    result = heldout_loss(model, tok, EXAMPLES, max_length=64, batch_size=3, progress=False)
    assert result.per_example_tokens == counts and result.n_tokens == sum(counts)
    assert result.loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert result.per_example == pytest.approx([s / c for s, c in zip(sums, counts, strict=True)], rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.loss != pytest.approx(sum(result.per_example) / len(EXAMPLES), rel=1e-3)  # token-weighted


def test_heldout_loss_does_not_depend_on_batch_size() -> None:
    tok = _loss_tokenizer()
    model = tiny_llama(seed=4, vocab_size=len(tok))
    one = heldout_loss(model, tok, EXAMPLES, max_length=64, batch_size=1, progress=False)
    four = heldout_loss(model, tok, EXAMPLES, max_length=64, batch_size=4, progress=False)
    assert four.per_example == pytest.approx(one.per_example, rel=1e-5)
    assert four.loss == pytest.approx(one.loss, rel=1e-5)


def test_long_prompts_are_cut_and_still_scored_and_an_empty_result_is_refused() -> None:
    from florist.eval.heldout import loss_result

    tok = _loss_tokenizer()
    model = tiny_llama(seed=5, vocab_size=len(tok))
    long_prompt = encode(EXAMPLES[1], tok, max_length=1000).labels.count(
        IGNORE
    )  # no room left for the response
    result = heldout_loss(model, tok, EXAMPLES[:2], max_length=long_prompt, progress=False)
    assert result.per_example_tokens[1] > 0 and not math.isnan(result.per_example[1])  # its middle gave way
    assert result.n_tokens == sum(result.per_example_tokens)
    none = loss_result(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([2, 0]))
    assert (
        math.isnan(none.per_example[1]) and json.loads(json.dumps(none.to_dict()))["per_example"][1] is None
    )
    with pytest.raises(ConfigError, match="no response token survived truncation"):
        loss_result(torch.zeros(2, dtype=torch.float64), torch.tensor([0, 0]))
    with pytest.raises(ConfigError, match="needs at least one example"):
        heldout_loss(model, tok, [], progress=False)


def test_paired_difference_matches_a_hand_computation() -> None:
    from florist.eval.heldout import loss_result
    from florist.eval.paired import paired_difference, t_quantile

    n = torch.tensor([3, 1, 4, 2, 5])
    a = loss_result(torch.tensor([3.0, 1.5, 4.4, 2.0, 5.5], dtype=torch.float64), n)
    b = loss_result(torch.tensor([2.7, 1.6, 4.0, 2.1, 5.0], dtype=torch.float64), n)
    d = paired_difference(a, b)
    diffs = torch.tensor([-0.3, 0.1, -0.4, 0.1, -0.5], dtype=torch.float64)  # summed, per row
    mean = float(diffs.sum() / n.sum())
    assert d.mean == pytest.approx(b.loss - a.loss) == pytest.approx(mean)
    se = float(((diffs - mean * n) ** 2).sum() * 5 / 4) ** 0.5 / 15
    assert d.se == pytest.approx(se)
    assert (d.high - d.mean) == pytest.approx(2.7764 * se, rel=2e-3)  # t(4, 0.975) = 2.7764
    assert d.excludes_zero() == (d.high < 0 or d.low > 0)
    assert t_quantile(0.975, 79) == pytest.approx(1.9905, abs=1e-3)
    same = paired_difference(a, a)
    assert same.mean == same.se == same.low == same.high == 0.0


def test_paired_difference_refuses_different_rows() -> None:
    from florist.eval.heldout import loss_result
    from florist.eval.paired import paired_difference

    a = loss_result(torch.ones(5, dtype=torch.float64), torch.tensor([1, 1, 1, 1, 1]))
    b = loss_result(torch.ones(5, dtype=torch.float64), torch.tensor([1, 1, 1, 1, 2]))
    with pytest.raises(ConfigError, match="same rows"):
        paired_difference(a, b)
    three = loss_result(torch.ones(3, dtype=torch.float64), torch.tensor([1, 1, 1]))
    with pytest.raises(ConfigError, match="at least 4 scored rows"):
        paired_difference(three, three)


def test_paired_over_seeds_adds_the_seed_spread_to_the_row_spread() -> None:
    """Hand computation: three seeds whose differences are the same rows shifted by -0.1, 0, +0.1 per
    token, so the seed-averaged rows equal seed 1's; se^2 = var_s(D_s)/S + se_rows^2."""
    from florist.eval.heldout import loss_result
    from florist.eval.paired import paired_difference, paired_over_seeds, t_quantile

    n = torch.tensor([3, 1, 4, 2, 5])
    sums = torch.tensor([3.0, 1.5, 4.4, 2.0, 5.5], dtype=torch.float64)
    base = loss_result(sums, n)
    b_sums = torch.tensor([2.7, 1.6, 4.0, 2.1, 5.0], dtype=torch.float64)
    pairs = [(base, loss_result(b_sums + shift * n, n)) for shift in (-0.1, 0.0, 0.1)]
    d = paired_over_seeds(pairs)
    middle = paired_difference(*pairs[1])
    assert d.mean == pytest.approx(middle.mean)
    seed_var = (0.1**2 + 0.0 + 0.1**2) / 2 / 3
    se = (seed_var + middle.se**2) ** 0.5
    assert d.se == pytest.approx(se)
    df = int(se**4 / (seed_var**2 / 2 + middle.se**4 / 4))
    assert d.high - d.mean == pytest.approx(t_quantile(0.975, df) * se)
    assert paired_over_seeds(pairs[:1]) == paired_difference(*pairs[0])
    same = paired_over_seeds([pairs[1]] * 3)  # identical seeds: only the rows' spread
    assert same.mean == pytest.approx(middle.mean) and same.se == pytest.approx(middle.se)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
