"""The generated skills set (determinism, disjoint splits, answers right by construction) and exact match."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from florist.data.prompt import prompt
from florist.data.records import Example
from florist.data.skills import OPPOSITES, SKILLS, generate_skills, make_skills_dataset, number_to_words
from florist.errors import ConfigError
from florist.eval.exact_match import exact_match, left_pad, normalize, score


def test_generation_is_deterministic_in_seed() -> None:
    assert generate_skills(6, seed=3) == generate_skills(6, seed=3)
    assert generate_skills(6, seed=3) != generate_skills(6, seed=4)
    assert make_skills_dataset(20, 5, seed=3) == make_skills_dataset(20, 5, seed=3)
    assert make_skills_dataset(20, 5, seed=3) != make_skills_dataset(20, 5, seed=4)


def test_every_skill_is_generated_under_its_own_category() -> None:
    data = generate_skills(4, seed=0)
    assert Counter(ex.category for ex in data) == dict.fromkeys(SKILLS, 4)
    some = generate_skills(3, seed=0, skills=["sort", "capital"])
    assert [ex.category for ex in some] == ["sort"] * 3 + ["capital"] * 3
    assert some[:3] == [ex for ex in data if ex.category == "sort"][:3], "a skill's draws ignore the others"


def test_test_prompts_are_distinct_and_never_in_train() -> None:
    train, test = make_skills_dataset(150, 30, seed=0)
    test_prompts = [prompt(ex) for ex in test]
    assert len(set(test_prompts)) == len(test) == 30 * len(SKILLS)
    assert not set(test_prompts) & {prompt(ex) for ex in train}
    assert Counter(ex.category for ex in train) == dict.fromkeys(SKILLS, 150)


def test_unknown_skill_and_impossible_sizes_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown skill\(s\) \['juggling'\]; choose from \[.*'sort'"):
        generate_skills(2, seed=0, skills=["sort", "juggling"])
    with pytest.raises(ConfigError, match="without repeats, got \\['sort', 'sort'\\]"):
        generate_skills(2, seed=0, skills=["sort", "sort"])
    with pytest.raises(ConfigError, match="n_per_skill must be >= 0, got -1"):
        generate_skills(-1, seed=0)
    with pytest.raises(
        ConfigError, match="skill 'capital' gave only .* distinct prompts, fewer than the 500"
    ):
        make_skills_dataset(1, 500, seed=0, skills=["capital"])
    with pytest.raises(ConfigError, match="skill 'capital' has too few prompts left after the test split"):
        make_skills_dataset(1, 70, seed=0, skills=["capital"])  # the table holds 70 countries


def _check(ex: Example) -> bool:
    """Recompute the answer from the prompt with logic independent of the generators."""
    ctx, want = ex.context, ex.response
    checks = {
        "first_letter": lambda: want == ctx[:1] and ctx.isalpha(),
        "add": lambda: int(want) == sum(int(x) for x in ctx.split(" + ")),
        "next_number": lambda: _next_term([int(x) for x in ctx.split(", ")]) == int(want),
        "sort": lambda: [int(x) for x in want.split(", ")] == sorted(int(x) for x in ctx.split(", ")),
        "to_words": lambda: want == number_to_words(int(ctx)),
        "capital": lambda: ctx not in KNOWN_CAPITALS or want == KNOWN_CAPITALS[ctx],
        "opposite": lambda: (
            OPPOSITES[want] == ctx and (ctx not in KNOWN_OPPOSITES or want == KNOWN_OPPOSITES[ctx])
        ),
    }
    return checks[ex.category]()


def _next_term(terms: Sequence[int]) -> int:
    steps = {b - a for a, b in itertools.pairwise(terms)}
    assert len(steps) == 1 and len(terms) == 4, f"not four terms of an arithmetic sequence: {terms}"
    return terms[-1] + steps.pop()


KNOWN_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa"}
KNOWN_OPPOSITES = {"hot": "cold", "cold": "hot", "wet": "dry", "buy": "sell", "sell": "buy", "yes": "no"}


def test_every_answer_is_correct_by_construction() -> None:
    data = generate_skills(200, seed=11)
    wrong = [ex for ex in data if not _check(ex)]
    assert not wrong, wrong[:3]
    seen = {ex.context for ex in data}
    assert seen & set(KNOWN_CAPITALS) and seen & set(KNOWN_OPPOSITES), "table skills were not checked"


def test_number_to_words_against_hand_written_values() -> None:
    cases = {
        1: "one", 9: "nine", 10: "ten", 11: "eleven", 13: "thirteen", 19: "nineteen", 20: "twenty",
        21: "twenty-one", 40: "forty", 47: "forty-seven", 90: "ninety", 99: "ninety-nine",
    }  # fmt: skip
    assert {n: number_to_words(n) for n in cases} == cases
    for bad in (0, 100):
        with pytest.raises(ValueError, match=f"covers 1..99, got {bad}"):
            number_to_words(bad)


def test_every_response_is_short() -> None:
    assert max(len(ex.response.split()) for ex in generate_skills(50, seed=0)) <= 3


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("  Paris.<|im_end|>", "paris"),
        ("PARIS", "paris"),
        ('"forty-seven"', "forty-seven"),
        ("7, 19,   42.", "7, 19, 42"),
        ("Kuala\tLumpur!", "kuala lumpur"),
        ("", ""),
        ("The answer is 5", "the answer is 5"),
    ],
)
def test_normalize(raw: str, want: str) -> None:
    assert normalize(raw) == want


def _ex(response: str, category: str, i: int = 0) -> Example:
    return Example(f"Question {i}?", response, category=category)


def test_score_counts_overall_and_per_category_exactly() -> None:
    examples = [_ex("a", "x", 0), _ex("b", "x", 1), _ex("c", "x", 2), _ex("d", "y", 3), _ex("e", "z", 4)]
    result = score(examples, ["A.", "wrong", "c", "d", ""])
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.per_category == {"x": pytest.approx(2 / 3), "y": 1.0, "z": 0.0}
    assert (result.n, result.n_per_category) == (5, {"x": 3, "y": 1, "z": 1})
    assert [p.correct for p in result.predictions] == [True, False, True, True, False]
    assert json.loads(json.dumps(result.to_dict()))["predictions"][1]["answer"] == "wrong"
    with pytest.raises(ValueError, match="1 answers for 5 examples"):
        score(examples, ["a"])


class CharTokenizer:
    """One id per character (ord), 0 is pad and eos; enough of a tokenizer for ``generate_answers``."""

    eos_token_id = pad_token_id = 0
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def batch_decode(self, rows: torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return ["".join(chr(int(i)) for i in row if i != 0) for row in rows]


class ScriptedModel:
    """``generate`` appends a scripted reply per prompt; it checks the batch is left-padded."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies, self.training = replies, True
        self.batch_sizes: list[int] = []

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        assert not self.training and kw["do_sample"] is False
        assert torch.equal(attention_mask, attention_mask.sort(dim=1).values), "not left-padded"
        prompts = CharTokenizer().batch_decode(input_ids)
        new = [[ord(c) for c in self.replies[p]][: kw["max_new_tokens"]] for p in prompts]
        width = max(len(r) for r in new)
        tail = torch.tensor([r + [0] * (width - len(r)) for r in new], dtype=torch.long)
        self.batch_sizes.append(len(prompts))
        return torch.cat([input_ids, tail], dim=1)


def test_exact_match_with_a_scripted_model() -> None:
    examples = [
        _ex("Paris", "capital", 0),
        _ex("7", "count", 1),
        _ex("3", "count", 22),
        _ex("x", "count", 333),
    ]
    replies = ["Paris\nThe capital of France.", "7.", "The answer is 3", "x" * 40]
    model = ScriptedModel({prompt(ex): r for ex, r in zip(examples, replies, strict=True)})
    result = exact_match(model, CharTokenizer(), examples, max_new_tokens=16, batch_size=3, progress=False)
    assert [p.answer for p in result.predictions] == ["Paris", "7.", "The answer is 3", "x" * 16]
    assert result.per_category == {"capital": 1.0, "count": pytest.approx(1 / 3)}
    assert result.accuracy == 0.5 and result.n == 4
    assert model.batch_sizes == [3, 1] and model.training, "batched by 3, training mode given back"
    with pytest.raises(ConfigError, match="must be >= 1, got 0, 16"):
        exact_match(model, CharTokenizer(), examples, batch_size=0)


def test_left_pad_shapes_and_mask() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
