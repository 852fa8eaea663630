"""Load instruction data from local files, a local ``datasets`` folder, or a Hugging Face hub data set.

load_examples("../shared/data/dolly-8clients/client_0.json")          # one JSON / JSON Lines / Parquet file
load_examples("../shared/data/dolly-8clients", exclude=("test.json",)) # every *.json / *.jsonl / *.parquet
load_examples("my_dolly_copy")                                         # a datasets.save_to_disk folder
load_examples("databricks/databricks-dolly-15k")                       # hub id (needs the network)

The last two need the ``datasets`` package (the ``hub`` extra, which ``make`` installs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from florist.data.records import Example, detect_format, to_example
from florist.errors import ConfigError

SUFFIXES = (".json", ".jsonl", ".parquet")
SAVED = ("dataset_info.json", "dataset_dict.json")  # what datasets.save_to_disk leaves in a folder


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON array file, a JSON Lines file or a Parquet file."""
    if path.suffix == ".parquet":
        try:
            return _parquet_rows(path)
        except ConfigError:
            raise
        except Exception as err:  # a truncated or foreign file: pyarrow's own error types
            raise ConfigError(
                f"{str(path)!r} is not a readable Parquet file: {type(err).__name__}: {err}"
            ) from err
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable UTF-8 text file: {err}") from err
    rows = _json_rows(path, text)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ConfigError(f"{str(path)!r} row {bad} is not a JSON object (one object per example)")
    return rows


def _json_rows(path: Path, text: str) -> list[Any]:
    """A JSON array, else JSON Lines; a bad line is named by its line number (1-based)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{str(path)!r} is not a valid JSON array: {err}") from err
        if not isinstance(rows, list):
            raise ConfigError(f"{str(path)!r} must hold a JSON array or JSON Lines")
        return rows
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{str(path)!r} line {number} is not valid JSON: {err.msg}") from err
    return out


def load_examples(
    source: str | Path,
    *,
    fmt: str | None = None,
    split: str = "train",
    exclude: Sequence[str] = (),
    label: str = "category",
) -> list[Example]:
    """Examples from a local file, a local folder (sorted files) or a hub data set id; each example's
    label is its row's ``label`` column (``data.label``)."""
    path = Path(source)
    if path.is_file():
        return _from_rows(read_rows(path), fmt, str(path), label)
    if path.is_dir() and any((path / name).is_file() for name in SAVED):
        return _from_saved(path, fmt, split, label)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.name not in exclude)
        if not files:
            raise ConfigError(f"folder {str(path)!r} has no .json, .jsonl or .parquet files")
        return [ex for f in files for ex in _from_rows(read_rows(f), fmt, str(f), label)]
    if looks_like_hub_id(str(source)):
        return _from_hub(str(source), fmt, split, label)
    raise ConfigError(f"data source {str(source)!r} is neither a file, a folder nor a hub data set id")


def _from_rows(
    rows: list[dict[str, Any]], fmt: str | None, where: str, label: str = "category"
) -> list[Example]:
    if not rows:
        raise ConfigError(f"{where!r} holds no examples")
    fmt = fmt or detect_format(rows[0])
    return [to_example(r, fmt, f"{where} row {i}", label) for i, r in enumerate(rows)]


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # the hub extra is not installed
        raise ConfigError(
            "hub ids and save_to_disk folders need the `datasets` package: "
            "pip install 'florist[hub]' (make installs it)"
        ) from err
    return datasets


def _from_hub(repo_id: str, fmt: str | None, split: str, label: str = "category") -> list[Example]:
    datasets = _datasets()
    try:
        data = datasets.load_dataset(repo_id, split=split)
    except (ConnectionError, OSError) as err:
        raise ConfigError(
            f"data.source {repo_id!r} is read as a Hugging Face hub id and the hub could not be reached "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); on a machine with access, "
            "datasets.load_dataset(...).save_to_disk(DIR) and point data.source at DIR"
        ) from err
    except ValueError as err:  # e.g. an unknown split
        raise ConfigError(f"hub data set {repo_id!r}: {err}") from err
    return _from_rows([dict(r) for r in data], fmt, repo_id, label)


def _from_saved(path: Path, fmt: str | None, split: str, label: str = "category") -> list[Example]:
    """A folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s: ``split`` picks one)."""
    data = _datasets().load_from_disk(str(path))
    if hasattr(data, "keys"):  # a DatasetDict
        if split not in data:
            raise ConfigError(f"{str(path)!r} holds splits {sorted(data.keys())}, not {split!r}")
        data = data[split]
    return _from_rows([dict(r) for r in data], fmt, str(path), label)


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ConfigError(f"{str(path)!r}: Parquet files need pyarrow (pip install 'florist[hub]')") from err
    try:
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's own errors for a truncated or foreign file
        raise ConfigError(f"{str(path)!r} is not a readable Parquet file: {err}") from err
    return rows
