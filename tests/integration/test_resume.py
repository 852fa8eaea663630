"""Checkpoint and resume: SIGKILL the server mid-run, resume, get bitwise the same run.

Run A goes uninterrupted. Run B is killed (the florist process and every process below it: Ray's
GCS, raylet and workers) as soon as its round-2 checkpoint exists; its latest checkpoint is then
corrupted on purpose, so the resume must fall back to the one before it; ``--resume`` finishes it.
The final adapter, every round's adapter and metrics.jsonl (less wall-clock fields) must equal A's.
A changed config is refused without ``--force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from florist.config import to_toml
from florist.server.checkpoint import checkpoints
from tests.flower_helpers import save_tiny_model, tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def florist(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # a file, not a pipe: Ray's children may hold a pipe open
        return subprocess.Popen(
            [sys.executable, "-m", "florist.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return log.read_text(errors="replace")


def kill_tree(root: psutil.Process, known: dict[int, psutil.Process], marker: str) -> list[int]:
    """SIGKILL ``root`` first, then its descendants (``known`` were seen earlier) and any process
    whose command line names ``marker``."""
    root.send_signal(signal.SIGKILL)
    procs = {root.pid: root, **known}
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            procs[p.pid] = p
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs([p for p in procs.values() if p.pid != root.pid], timeout=30)  # Popen reaps root
    return sorted(procs)


def without_timing(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: without_timing(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [without_timing(v) for v in x]
    return x


def metrics(run: Path) -> list[Any]:
    return [without_timing(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    cfg = tiny_run_config(
        model, tmp_path / "runs", "x", "federation.rounds=4", "run.save_client_updates=false"
    )
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    ray_tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp)}

    a = florist(["run", str(config), "run.name='a'"], env, tmp_path / "a.log")
    out_a = finish(a, tmp_path / "a.log")
    assert a.returncode == 0, out_a[-3000:]

    b = florist(["run", str(config), "run.name='b'"], env, tmp_path / "b.log")
    folder = tmp_path / "runs" / "b" / "checkpoints"
    deadline = time.monotonic() + 300
    root, known = psutil.Process(b.pid), {}
    while not (folder / "round-002.pt.sha256").is_file():
        assert b.poll() is None and time.monotonic() < deadline, (tmp_path / "b.log").read_text()[-3000:]
        known.update({p.pid: p for p in root.children(recursive=True)})
        time.sleep(0.05)
    killed = kill_tree(root, known, str(ray_tmp))
    assert b.wait(timeout=30) == -signal.SIGKILL and len(killed) > 1
    assert not (tmp_path / "runs" / "b" / "summary.json").exists()

    found = checkpoints(folder)
    latest = found[-1]
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: the sha256 check must catch it
    latest.write_bytes(bytes(data))

    changed = subprocess.run(
        [sys.executable, "-m", "florist.cli", "run", str(config), "run.name='b'", "train.lr=0.02", "--resume"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert (
        changed.returncode == 2 and "train.lr: 0.01 -> 0.02" in changed.stderr and "--force" in changed.stderr
    )

    r = florist(["run", str(config), "run.name='b'", "--resume"], env, tmp_path / "r.log")
    out_r = finish(r, tmp_path / "r.log")
    assert r.returncode == 0, out_r[-3000:]
    assert f"checkpoint {latest.name} is corrupt" in out_r and "falling back" in out_r
    previous = int(found[-2].name[6:9])
    assert f"resuming from {found[-2].name} (round {previous})" in out_r

    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert metrics(run_b) == metrics(run_a)
    for rel in ["adapter/adapter_model.safetensors"] + [
        f"rounds/round-{t:03d}/adapter/adapter_model.safetensors" for t in range(1, 5)
    ]:
        assert (run_b / rel).read_bytes() == (run_a / rel).read_bytes(), rel
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run_a, run_b))
    assert sb["sync"]["server_digest"] == sa["sync"]["server_digest"] and sb["sync"]["clients_match_server"]
    assert sb["bytes_up"] == sa["bytes_up"] and sb["bytes_down"] == sa["bytes_down"]
    print(
        f"killed {len(killed)} processes with {[p.name for p in found]} on disk; {latest.name} corrupted; "
        f"resumed from {found[-2].name}; {len(metrics(run_b))} metrics lines and "
        f"{sum(1 for _ in run_b.rglob('*.safetensors'))} adapters equal run A's bitwise"
    )
    alive = [p for p in killed if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sigterm_stops_every_process_florist_run_started(tmp_path: Path) -> None:
    """``timeout`` or a scheduler sends SIGTERM to ``florist run``: it stops its SuperLink, the
    simulation and Ray's workers on the way out instead of leaving them running."""
    model = save_tiny_model(tmp_path / "tiny")
    cfg = tiny_run_config(
        model, tmp_path / "runs", "t", "federation.rounds=6", "run.save_client_updates=false"
    )
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ft-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp)}
    proc = florist(["run", str(config)], env, tmp_path / "t.log")
    root, known = psutil.Process(proc.pid), {}
    folder = tmp_path / "runs" / "t" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (folder / "round-001.pt.sha256").is_file():  # running: the simulation and its workers
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "t.log").read_text()[-3000:]
        known.update({p.pid: p for p in root.children(recursive=True)})
        time.sleep(0.05)
    known.update({p.pid: p for p in root.children(recursive=True)})
    assert len(known) > 2
    assert "\r" not in (tmp_path / "t.log").read_text(errors="replace")  # a log file gets no bar redraws
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=120) != 0
        _, alive = psutil.wait_procs(list(known.values()), timeout=60)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:  # whatever the outcome, nothing of this test keeps running
        if proc.poll() is None:
            kill_tree(root, known, str(ray_tmp))
        for p in known.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
