"""A bad data file stops ``florist run`` with exit 2 and one line naming file, line and field, before
any node starts and before any run directory is made."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from florist.cli import main

GOOD = {"instruction": "Say hi.", "context": "", "response": "hi", "category": "qa"}


def _jsonl(rows: list[Any]) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


CASES: dict[str, tuple[str, str | bytes, str]] = {
    "empty array": ("data.json", "[]", r"data.json' holds no examples"),
    "malformed line 2": ("data.jsonl", _jsonl([GOOD]) + "{oops\n", r"data.jsonl' line 2 is not valid JSON"),
    "binary json": ("data.json", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", r"data.json' is not a readable UTF-8 text file"),
    "truncated parquet": ("data.parquet", b"PAR1\x00\x00", r"data.parquet' is not a readable Parquet file"),
    "null response": ("data.jsonl", _jsonl([GOOD, {**GOOD, "response": None}]), r"data.jsonl row 1: field 'response' must be text, got None"),
    "empty response": ("data.jsonl", _jsonl([GOOD, {**GOOD, "response": "  "}]), r"row 1: field 'response' is empty"),
    "not an object": ("data.json", json.dumps([GOOD, [1, 2]]), r"data.json' row 1 is not a JSON object"),
    "bad wizard": ("data.jsonl", _jsonl([{"conversations": [{"from": "human", "value": "hi"}]}]),
                   r"row 0: 'conversations' needs a human \(or user\) turn and a gpt"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_data_file_exits_2_in_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, content, want = CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    started: list[Any] = []
    monkeypatch.setattr("florist.commands.run.run_simulation", lambda cfg: started.append(cfg))
    runs, config = tmp_path / "runs", tmp_path / "run.toml"
    config.write_text("")
    code = main(["run", str(config), f"data.source={str(path)!r}", "data.split='iid'", "federation.num_clients=1",
                 f"run.dir={str(runs)!r}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and started == [] and not runs.exists()
    assert len(err.splitlines()) == 1, err
    assert re.search(want, err), err


def test_report_reads_what_it_can_of_a_torn_metrics_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn last line (full disk, power loss), a non-object line and a string round: skipped, named."""
    run = tmp_path / "run"
    run.mkdir()
    good = [
        {"round": 0, "eval": {"heldout_loss": 3.0}},
        {"round": 1, "bytes_up": 10, "bytes_down": 20, "train_loss": 2.0, "eval": {"heldout_loss": 2.5}},
        {"round": 2, "bytes_up": 10, "bytes_down": 20, "train_loss": 1.5, "eval": {"heldout_loss": 2.2}},
    ]
    lines = [
        json.dumps(good[0]),
        json.dumps(good[1]),
        "[1, 2]",
        json.dumps({"round": "3"}),
        json.dumps(good[2]),
        '{"round": 4, "bytes_up": 1',
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines))
    caplog.set_level("WARNING")
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "curves.png").is_file()
    skipped = [r.getMessage() for r in caplog.records if "is not a round record" in r.getMessage()]
    assert [m.rsplit(" line ", 1)[1].split()[0] for m in skipped] == ["3", "4", "6"]
