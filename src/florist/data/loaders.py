"""Load instruction data from a local JSON / JSON Lines file or folder, or a Hugging Face hub data set.

load_examples("../shared/data/dolly-8clients/client_0.json")          # one file
load_examples("../shared/data/dolly-8clients", exclude=("test.json",)) # every *.json / *.jsonl
load_examples("databricks/databricks-dolly-15k")                       # hub id (needs network)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from florist.data.records import Example, detect_format, to_example
from florist.errors import ConfigError

SUFFIXES = (".json", ".jsonl")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON array file or a JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows: list[dict[str, Any]] = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{str(path)!r} is neither a JSON array nor JSON Lines: {err}") from err
    if not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{str(path)!r} must hold JSON objects, one per example")
    return rows


def load_examples(
    source: str | Path, *, fmt: str | None = None, split: str = "train", exclude: Sequence[str] = ()
) -> list[Example]:
    """Examples from a local file, a local folder (sorted files) or a hub data set id."""
    path = Path(source)
    if path.is_file():
        return _from_rows(read_rows(path), fmt, str(path))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.name not in exclude)
        if not files:
            raise ConfigError(f"folder {str(path)!r} has no .json or .jsonl files")
        return [ex for f in files for ex in _from_rows(read_rows(f), fmt, str(f))]
    if _looks_like_hub_id(str(source)):
        return _from_hub(str(source), fmt, split)
    raise ConfigError(f"data source {str(source)!r} is neither a file, a folder nor a hub data set id")


def _from_rows(rows: list[dict[str, Any]], fmt: str | None, where: str) -> list[Example]:
    if not rows:
        return []
    fmt = fmt or detect_format(rows[0])
    return [to_example(r, fmt, f"{where} row {i}") for i, r in enumerate(rows)]


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))


def _from_hub(repo_id: str, fmt: str | None, split: str) -> list[Example]:
    try:
        from datasets import load_dataset
    except ImportError as err:  # datasets is not (yet) in florist's pinned stack: see the README
        raise ConfigError(
            f"data.source {repo_id!r} is read as a Hugging Face hub id, which needs the `datasets` "
            "package (pip install datasets); a local file or folder needs nothing more"
        ) from err
    rows = [dict(r) for r in load_dataset(repo_id, split=split)]
    return _from_rows(rows, fmt, repo_id)
