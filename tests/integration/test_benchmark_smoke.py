"""The aggregation benchmark runs end to end in its quick mode and writes complete results.

Times are only checked to be finite and positive: tests never assert wall-clock speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "aggregation.py"
SCENARIOS = {
    "smollm2-135m-attn",
    "llama7b-qv-r16",
    "llama7b-qv-hetero",
    "llama70b-all-k8",
    "llama70b-all-k32",
}
PATHS = {"florist_qr", "florist_svd", "florist_qr_ef", "flexlora", "peft_svd", "qr_bound", "geqrf_bound"}
LARGE = {"llama70b-all-k8", "llama70b-all-k32"}  # peft skipped, flexlora by the flop model


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.integration
def test_quick_benchmark_writes_every_scenario_and_path(tmp_path: Path) -> None:
    out = tmp_path / "aggregation.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert set(results["scenarios"]) == SCENARIOS
    for name, scenario in results["scenarios"].items():
        assert set(scenario["paths"]) | set(scenario["skipped_paths"]) == PATHS, name
        assert bool(scenario["skipped_paths"]) == (name in LARGE), name
        for path, row in scenario["paths"].items():
            assert _positive(row["seconds"]), (name, path, row["seconds"])
            assert all(_positive(t) for t in row["samples"]), (name, path, row["samples"])
            assert math.isfinite(row["peak_extra_mib"]), (name, path)
        for check, err in scenario["correctness"].items():
            assert err < 1e-3, (name, check, err)
    for name in LARGE:
        _check_large(results["scenarios"][name], name)
    assert "florist (qr, tau=0.9)" in proc.stdout


def _check_large(scenario: dict, name: str) -> None:
    """The 70B-shaped scenarios: all seven kinds, extrapolation and analytic memory marked."""
    assert set(scenario["kinds"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert len(scenario["ranks"]) == int(name.rsplit("k", 1)[1])
    flex = scenario["paths"]["flexlora"]
    assert flex["extrapolation"] == "flop model" and flex["measured_modules"] == 1, name
    assert flex["peak_source"] == "analytic", name
    assert set(flex["flop_model"]["seconds_per_module"]) == set(scenario["kinds"]), name
    for path in ("florist_qr", "florist_svd", "qr_bound", "geqrf_bound"):
        row = scenario["paths"][path]
        assert row["extrapolation"] == "linear" and row["peak_source"] == "measured", (name, path)
        assert _positive(row["best_seconds"]), (name, path)
    goal = scenario["goals"]["florist_over_qr_bound"]
    assert goal["target"] == "<= 1.5x" and _positive(goal["value"]), name
