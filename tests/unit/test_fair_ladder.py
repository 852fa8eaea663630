"""The fair headline's ablation ladder: each rung paired against the rung it follows on the
validation rows (never the test rows), over the seeds both finished; rungs not run are left out."""

from __future__ import annotations

from typing import Any

import pytest

from florist.studies.fair import LADDER, ladder, ladder_markdown

ROWS = [2.0, 1.0, 3.0, 2.5]
TOKENS = [10, 20, 30, 40]


def _split(shift: float, noise: float) -> dict[str, Any]:
    rows = [x + shift + noise * (i % 2) for i, x in enumerate(ROWS)]
    loss = sum(r * t for r, t in zip(rows, TOKENS, strict=True)) / sum(TOKENS)
    return {"heldout_loss": loss, "perplexity": 1.0, "heldout_rows": rows, "heldout_tokens": TOKENS}


def _variant(val_shift: float, test_shift: float, noise: float, mb: float) -> list[dict[str, Any]]:
    last = {"round": 2, "bytes_up": mb * 1e6 / 2, "bytes_down": mb * 1e6 / 2,
            "eval": _split(test_shift, noise) | {"validation": _split(val_shift, noise)}}  # fmt: skip
    return [{"round": 1, "bytes_up": 0, "bytes_down": 0}, last]


def test_each_rung_is_its_validation_loss_minus_the_previous_rungs() -> None:
    (first, start, _), (second, _, _) = LADDER[0], LADDER[1]
    per_seed = {
        0: {"homogeneous": {start: _variant(0.0, 0.0, 0.0, 10), first: _variant(-0.02, 5.0, 0.0, 20),
                            second: _variant(0.01, -5.0, 0.0, 20)}},
        1: {"homogeneous": {start: _variant(0.0, 0.0, 0.0, 10), first: _variant(-0.04, 5.0, 0.0, 20)}},
    }  # fmt: skip
    rungs = ladder(per_seed, "homogeneous", rounds=2)
    assert [r["variant"] for r in rungs] == [first, second]  # rungs with a variant not run are left out
    one, two = rungs
    assert one["versus"] == start and one["seeds"] == [0, 1] and two["seeds"] == [0]
    assert one["difference"]["mean"] == pytest.approx(-0.03)  # validation, not test (the +5 shift)
    assert one["difference"]["low"] < -0.03 < one["difference"]["high"]  # the seeds disagree: an interval
    assert two["difference"]["mean"] == pytest.approx(0.01 - -0.02)
    assert one["bytes"] == [10e6, 20e6]
    text = ladder_markdown(rungs)
    assert f"| {first} | {start} |" in text and "-0.0300" in text and "10.0 -> 20.0 MB" in text
    assert ladder_markdown([]) == ""
