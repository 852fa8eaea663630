"""The fair grid's scheduler (``benchmarks/fair_parallel.py``): which worker a job goes to, in what
order jobs start, that no two processes share a worker's folder, and that stage 1 runs heterogeneous
candidates beside the homogeneous runs and stops when a pass finishes nothing."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from florist.studies.headline import slug

ROUNDS = 2


@pytest.fixture(scope="module")
def grid() -> Iterator[ModuleType]:
    path = Path(__file__).parents[2] / "benchmarks" / "fair_parallel.py"
    spec = importlib.util.spec_from_file_location("fair_parallel_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def record(loss: float, spent: int) -> dict[str, Any]:
    ev = {"heldout_loss": loss, "perplexity": 1.0, "heldout_rows": [loss], "heldout_tokens": [1]}
    return {"bytes_up": spent, "bytes_down": 0, "eval": {**ev, "validation": ev}}


def done(loss: float, spent: int) -> list[dict[str, Any]]:
    return [record(loss, 0)] * (ROUNDS - 1) + [record(loss, spent)]


class FakeProcess:
    """A bench process that ends after two polls; records who ran at once."""

    running: ClassVar[set[tuple[str, str]]] = set()
    started: ClassVar[list[tuple[str, str]]] = []
    overlap: ClassVar[list[set[tuple[str, str]]]] = []

    def __init__(self, cmd: list[str], **_: Any) -> None:
        out = cmd[cmd.index("--out") + 1]
        self.key = (Path(out).name, cmd[cmd.index("--seeds") + 1])  # (worker folder, seed)
        assert self.key not in FakeProcess.running, f"two processes on {self.key}"
        self.name = cmd[cmd.index("--variants") + 1]
        FakeProcess.running.add(self.key)
        FakeProcess.started.append((self.key[0], self.name))
        FakeProcess.overlap.append(set(FakeProcess.running))
        self.polls, self.returncode = 0, None

    def poll(self) -> int | None:
        self.polls += 1
        if self.polls >= 2 and self.returncode is None:
            self.returncode = 0
            FakeProcess.running.discard(self.key)
        return self.returncode


@pytest.fixture
def args(tmp_path: Path, grid: ModuleType, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    monkeypatch.setattr(grid.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(grid.time, "sleep", lambda _: None)
    FakeProcess.running, FakeProcess.started, FakeProcess.overlap = set(), [], []
    (tmp_path / "out" / "work").mkdir(parents=True)
    return argparse.Namespace(out=tmp_path / "out", cache=tmp_path / "cache", workers=2, deadline=0,
                              overrides=[f"federation.rounds={ROUNDS}"])  # fmt: skip


def test_a_begun_job_resumes_on_the_worker_holding_its_checkpoints_and_a_finished_one_is_skipped(
    grid: ModuleType, args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grid, "merge", lambda _: {1: {"homogeneous": {"B": done(2.0, 10)}}})
    begun = args.cache / "w1-homogeneous" / "seed-1" / "homogeneous" / "variants" / slug("C")
    begun.mkdir(parents=True)
    (begun / "round-001.pt").write_bytes(b"")
    assert grid.checkpoint_worker(args, 1, "homogeneous", "C") == 1
    assert grid.checkpoint_worker(args, 1, "homogeneous", "A") is None
    jobs = [(1, "homogeneous", v) for v in ("A", "B", "C", "D")]  # places 0..3: C's would be worker 0
    grid.run_stage(args, jobs, 0.0)
    assert sorted(FakeProcess.started) == [("w0-homogeneous", "A"), ("w1-homogeneous", "C"),
                                           ("w1-homogeneous", "D")]  # fmt: skip
    assert all(len(at_once) <= args.workers for at_once in FakeProcess.overlap)


def test_jobs_start_by_place_so_each_lists_first_runs_first_in_every_setting_and_seed(
    grid: ModuleType, args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grid, "merge", lambda _: {})
    jobs = [
        (s, setting, v) for s in (1, 2) for setting in ("homogeneous", "heterogeneous") for v in ("F", "X")
    ]
    grid.run_stage(args, jobs, 0.0)
    firsts = [name for _, name in FakeProcess.started[:4]]
    assert firsts == ["F"] * 4  # every (seed, setting)'s first job before any second one
    assert len(FakeProcess.started) == len(jobs)


def test_stage_one_runs_frontier_candidates_of_the_other_setting_beside_and_repeats_while_they_grow(
    grid: ModuleType, args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    homogeneous = {"FedIT +bf16": done(2.0, 10), "FedIT +bf16 +x": done(2.1, 20)}  # +x: dominated
    state: dict[str, dict[str, Any]] = {"homogeneous": homogeneous, "heterogeneous": {}}
    monkeypatch.setattr(grid, "merge", lambda _: {0: state})
    passes: list[list[tuple[int, str, str]]] = []

    def run(_: argparse.Namespace, jobs: list[tuple[int, str, str]], __: float) -> None:
        passes.append(jobs)
        for _seed, setting, name in jobs:  # every job finishes
            state[setting].setdefault(name, done(1.9, 30))

    monkeypatch.setattr(grid, "run_stage", run)
    names = ["FedIT +bf16", "FedIT +bf16 +x", "FLoRA +bf16"]
    grid.select(args, names, ROUNDS, 0.0)
    homogeneous_jobs = [(0, "homogeneous", n) for n in names]
    assert passes == [
        [*homogeneous_jobs, (0, "heterogeneous", "FedIT +bf16")],  # FLoRA's homogeneous run not yet done
        [*homogeneous_jobs, (0, "heterogeneous", "FedIT +bf16"), (0, "heterogeneous", "FLoRA +bf16")],
    ]


def test_stage_one_stops_when_a_pass_finishes_nothing(
    grid: ModuleType, args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grid, "merge", lambda _: {0: {"homogeneous": {}}})
    passes: list[Any] = []
    monkeypatch.setattr(grid, "run_stage", lambda _a, jobs, _d: passes.append(jobs))
    grid.select(args, ["FedIT +bf16"], ROUNDS, 0.0)  # the job fails every time: one pass, then stop
    assert passes == [[(0, "homogeneous", "FedIT +bf16")]]
