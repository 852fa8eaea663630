"""Data loaders on local fixtures, the prompt template and the partitioners."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from florist.data.loaders import load_examples
from florist.data.partition import dirichlet_partition, iid_partition
from florist.data.prompt import prompt
from florist.data.records import Example
from florist.errors import ConfigError
from tests.helpers import SHARED_DATA

SHARED = SHARED_DATA / "dolly-8clients"
DOLLY = [{"instruction": "Sum 2 and 3.", "context": "", "response": "5", "category": "math"}]
ALPACA = [{"instruction": "Translate", "input": "chat", "output": "cat"}]
WIZARD = [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]


def test_formats_are_detected_from_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(DOLLY))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    (tmp_path / "w.json").write_text(json.dumps(WIZARD))
    assert load_examples(tmp_path / "d.json") == [Example("Sum 2 and 3.", "5", "", "math")]
    assert load_examples(tmp_path / "a.jsonl") == [Example("Translate", "cat", "chat")]
    assert load_examples(tmp_path / "w.json") == [Example("Hi?", "Hello.")]
    assert len(load_examples(tmp_path, exclude=("w.json",))) == 2


def test_bad_sources_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(ConfigError, match="bad.json' is not a valid JSON array"):
        load_examples(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(ConfigError, match=r"cannot tell the data format from the fields \['question'\]"):
        load_examples(tmp_path / "odd.json")
    with pytest.raises(
        ConfigError, match=r"odd.json row 0 has no field 'instruction' required by the dolly format"
    ):
        load_examples(tmp_path / "odd.json", fmt="dolly")
    with pytest.raises(ConfigError, match="is neither a file, a folder nor a hub data set id"):
        load_examples(tmp_path / "missing" / "x.json")


def test_prompt_template_with_and_without_context() -> None:
    plain = prompt(Example("Name a colour.", "Red"))
    assert plain.endswith("### Instruction:\nName a colour.\n\n### Response:\n") and "Input" not in plain
    ctx = prompt(Example("Summarise.", "Short.", context="A long text."))
    assert "### Input:\nA long text.\n\n### Response:\n" in ctx


def test_iid_partition_is_deterministic_and_complete() -> None:
    items = list(range(103))
    a, b = iid_partition(items, 4, seed=7), iid_partition(items, 4, seed=7)
    assert a == b and sorted(x for p in a for x in p) == items
    assert {len(p) for p in a} <= {25, 26}
    assert iid_partition(items, 4, seed=8) != a


def test_dirichlet_partition_is_deterministic_non_iid_and_respects_minimum() -> None:
    items = [(i, f"cat{i % 5}") for i in range(500)]
    parts = dirichlet_partition(items, 6, 0.3, label=lambda x: x[1], seed=1, min_partition_size=20)
    assert parts == dirichlet_partition(items, 6, 0.3, label=lambda x: x[1], seed=1, min_partition_size=20)
    assert sorted(x for p in parts for x in p) == items
    assert min(len(p) for p in parts) >= 20
    mixes = [Counter(label for _, label in p) for p in parts]
    assert any(m.most_common(1)[0][1] > 0.5 * sum(m.values()) for m in mixes), "alpha=0.3 should skew clients"


def test_partition_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match="dirichlet alpha must be positive, got 0"):
        dirichlet_partition(list(range(10)), 2, 0, label=str, seed=0)
    with pytest.raises(ConfigError, match="10 examples cannot give 4 clients 3 examples each"):
        iid_partition(list(range(10)), 4, seed=0, min_partition_size=3)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared Dolly split not found at {SHARED}")
def test_shared_dolly_split_loads_with_paper_sizes() -> None:
    sizes = [len(load_examples(SHARED / f"client_{k}.json")) for k in range(8)]
    assert sizes == [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]
    test = load_examples(SHARED / "test.json")
    assert len(test) == 80 and len({ex.category for ex in test}) == 8
