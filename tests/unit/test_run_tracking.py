"""Run tracking: ``run.tensorboard`` writes the round records as scalars; ``florist report RUN`` draws
the curves from metrics.jsonl (which stays the source of truth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florist.cli import main
from florist.config import load_config
from florist.server.rundir import RunDir

RECORDS = [
    {"round": 0, "eval": {"heldout_loss": 3.0, "exact_match": 0.0}},
    {"round": 1, "train_loss": 2.5, "bytes_up": 1_000_000, "bytes_down": 0, "bytes_catchup": 0, "rank_total": 30,
     "ranks": {"model.layers.0.q": 10, "model.layers.1.q": 20}, "eval": {"heldout_loss": 2.0, "exact_match": 0.5}},
    {"round": 2, "train_loss": 1.5, "bytes_up": 1_000_000, "bytes_down": 2_000_000, "bytes_catchup": 0, "rank_total": 25,
     "ranks": {"model.layers.0.q": 5, "model.layers.1.q": 20}, "eval": {"heldout_loss": 1.0, "exact_match": 0.75}},
]  # fmt: skip


def _run(tmp_path: Path, *overrides: str) -> RunDir:
    cfg = load_config(None, [f"run.dir={str(tmp_path)!r}", "run.name='r'", *overrides])
    rundir = RunDir(cfg, "base")
    rundir.create()
    for r in RECORDS:
        rundir.append_metrics(r)
    return rundir


def test_tensorboard_gets_every_round_and_cumulative_bytes(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rundir = _run(tmp_path, "run.tensorboard=true")
    rundir.tracker.close()
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {
        "round/train_loss",
        "eval/heldout_loss",
        "round/bytes_total_cumulative",
        "round/rank_total",
    } <= set(tags)
    assert [(e.step, e.value) for e in acc.Scalars("eval/heldout_loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [e.value for e in acc.Scalars("round/bytes_total_cumulative")] == [0.0, 1e6, 4e6]


def test_tensorboard_gets_the_privacy_spent() -> None:
    from florist.server.tracking import scalars

    central = scalars({"round": 2, "epsilon": 1.5}, 0)
    local = scalars({"round": 2, "client_metrics": {"client-000": {"epsilon": 0.7}, "client-001": {"epsilon": 2.5},
                                                    "client-002": {"train_loss": 1.0}}}, 0)  # fmt: skip
    assert central["privacy/epsilon"] == 1.5 and "privacy/epsilon_max_client" not in central
    assert local["privacy/epsilon_max_client"] == 2.5 and "privacy/epsilon" not in local


def test_no_tensorboard_dir_unless_asked(tmp_path: Path) -> None:
    _run(tmp_path)
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_report_draws_curves_and_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from florist.commands.report import cumulative_mb

    _run(tmp_path)
    assert main(["report", str(tmp_path / "r")]) == 0
    for name in ("curves.png", "ranks.png"):
        assert (tmp_path / "r" / "report" / name).read_bytes()[:4] == b"\x89PNG"
    assert cumulative_mb(RECORDS) == [0.0, 1.0, 4.0]
    assert "curves.png" in capsys.readouterr().out


def test_report_on_something_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory (no metrics.jsonl)" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no finished round yet" in capsys.readouterr().err
