"""The same ServerApp and ClientApp under ``flwr run`` (a local SuperLink, simulation, 3 SuperNodes).

``flwr run`` starts a detached SuperLink; the test finds it (and the processes it started) by the
log file under its own FLWR_HOME and stops them by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from florist.deploy.runconfig import DEFAULT_APP
from tests.flower_helpers import save_tiny_model

pytestmark = pytest.mark.integration
LOCAL_SUPERLINK = "http://127.0.0.1:39091/health"


def superlink_running() -> bool:
    try:
        return httpx.get(LOCAL_SUPERLINK, timeout=1).is_success
    except httpx.HTTPError:
        return False


def stop_processes_of(flwr_home: Path) -> list[int]:
    """Stop, by pid, every process whose command line names ``flwr_home``, and their descendants."""
    roots = [
        p for p in psutil.process_iter(["cmdline"]) if str(flwr_home) in " ".join(p.info["cmdline"] or [])
    ]
    procs = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}
    for p in procs.values():
        p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        p.kill()
    return sorted(procs)


def test_flwr_run_local_simulation(tmp_path: Path) -> None:
    if superlink_running():  # checked when the test runs, not at collection: another may have started since
        pytest.skip("another local SuperLink already holds 127.0.0.1:39091")
    model = save_tiny_model(tmp_path / "tiny")
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n'
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    overrides = " ".join(
        [
            f"model.name='{model}'", "federation.num_clients=3", "federation.rounds=2", "lora.ranks='[8, 4, 2]'",
            "train.steps=2", "train.batch_size=2", "data.skills_train=6", "data.skills_test=2",
            "eval.max_new_tokens=3", f"run.dir='{tmp_path / 'runs'}'", "run.name='flwr'", "run.progress=false",
        ]
    )  # fmt: skip
    flwr = shutil.which("flwr", path=bin_dir)
    assert flwr is not None
    try:
        proc = subprocess.run(
            [flwr, "run", str(DEFAULT_APP), "local", "--stream",
             "--federation-config", "num-supernodes=3", "--run-config", overrides],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        stopped = stop_processes_of(home)
    assert stopped, "no SuperLink process was found under FLWR_HOME"
    run = tmp_path / "runs" / "flwr"
    assert (run / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["sync"]["clients_match_server"]
    assert len([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]) == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
