"""The wheel works outside the repository: it carries the packaged configs and the Flower App, and
``florist deploy --help`` and a tiny ``florist run`` work from it in a folder far from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.flower_helpers import save_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_runs_outside_the_repository(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("florist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "florist/flower_app/pyproject.toml" in names and "florist/configs/demo.toml" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def florist(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "florist.cli", *args], cwd=away, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    where = subprocess.run(
        [sys.executable, "-c", "import florist; print(florist.__file__)"], cwd=away, env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target)), where.stdout  # the wheel's copy, not the checkout
    helped = florist("deploy", "--help")
    assert helped.returncode == 0 and "--nodes" in helped.stdout, helped.stderr[-2000:]
    app = florist("config", "--app-dir").stdout.strip()
    assert app.startswith(str(target)) and (Path(app) / "pyproject.toml").is_file()

    model = save_tiny_model(tmp_path / "tiny")
    ran = florist(
        "run", "demo", f"model.name={str(model)!r}", "run.dir='runs'", "run.name='w'", "federation.num_clients=2",
        "federation.rounds=1", "lora.ranks=[4]", "train.steps=1", "train.batch_size=2", "data.skills_train=4",
        "data.skills_test=2", "eval.max_new_tokens=2", "run.progress=false",
    )  # fmt: skip
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    summary = json.loads((away / "runs" / "w" / "summary.json").read_text())
    assert (away / "runs" / "w" / "adapter" / "adapter_model.safetensors").is_file() and summary
