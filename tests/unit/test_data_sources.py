"""Every way a user points florist at data, on small files the test writes: JSON, JSON Lines, Parquet,
a ``datasets.save_to_disk`` folder (one split or a DatasetDict), a hub id (the hub is replaced by a
local ``datasets`` folder), and a hub that cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from florist.data.loaders import load_examples
from florist.errors import ConfigError

ROWS = [
    {"instruction": f"Name number {i}.", "context": "", "response": f"It is {i}.", "category": "open_qa"}
    for i in range(5)
]


def _check(examples: list) -> None:  # type: ignore[type-arg]
    assert [e.response for e in examples] == [r["response"] for r in ROWS]
    assert examples[2].instruction == "Name number 2."


def test_json_jsonl_and_parquet_files_and_a_mixed_folder(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    for name in ("a.json", "b.jsonl", "c.parquet"):
        _check(load_examples(tmp_path / name))
    assert len(load_examples(tmp_path)) == 15
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="bad.parquet' is not a readable Parquet file"):
        load_examples(tmp_path / "bad.parquet")


def test_a_save_to_disk_folder_and_a_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    _check(load_examples(tmp_path / "one"))
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    _check(load_examples(tmp_path / "dict"))
    assert len(load_examples(tmp_path / "dict", split="test")) == 2
    with pytest.raises(ConfigError, match=r"holds splits \['test', 'train'\], not 'validation'"):
        load_examples(tmp_path / "dict", split="validation")


def test_a_hub_id_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is a local datasets folder here: the id, split and row conversion are florist's own."""
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hub-copy"))
    calls = []

    def fake_load(repo_id: str, split: str) -> datasets.Dataset:
        calls.append((repo_id, split))
        return datasets.load_from_disk(str(tmp_path / "hub-copy"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    _check(load_examples("databricks/databricks-dolly-15k"))
    assert calls == [("databricks/databricks-dolly-15k", "train")]


def test_an_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "from florist.data.loaders import load_examples\n"
        "from florist.errors import ConfigError\n"
        "try:\n    load_examples('databricks/databricks-dolly-15k')\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "is read as a Hugging Face hub id and the hub could not be reached" in out.stdout, out.stderr[
        -2000:
    ]
    assert "save_to_disk(DIR)" in out.stdout
