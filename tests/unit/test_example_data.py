"""The example data files under examples/data/ load in the format their name says, detected from
their fields, as the README of that folder tells users."""

from __future__ import annotations

from pathlib import Path

import pytest

from florist.config.schema import FORMATS
from florist.data.loaders import load_examples
from florist.data.records import detect_format

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_has_an_example_file_that_loads(fmt: str) -> None:
    import json

    path = EXAMPLES / f"{fmt}.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    assert detect_format(first) == fmt
    examples = load_examples(str(path))
    assert len(examples) >= 4 and all(ex.instruction and ex.response for ex in examples)
    assert examples == load_examples(str(path), fmt=fmt)
    if fmt == "chat":
        assert any(ex.history for ex in examples)  # a system turn and an earlier exchange are kept
