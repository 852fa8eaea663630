"""florist regime end to end on a tiny random Llama and the skills set: round-1 uploads at every budget
from one training run, every method aggregated offline, resume without retraining, regimes never mixed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from florist.errors import ConfigError
from florist.studies.regime import RegimeOptions, run, write_report
from tests.flower_helpers import save_tiny_model

pytestmark = pytest.mark.integration


def test_regime_study_cells_resume_and_refuse_another_regime(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    overrides = (
        f"model.name={str(model)!r}", "data.source='skills'", "data.split='dirichlet'", "data.test=none",
        "data.skills_train=6", "data.skills_test=2", "data.max_examples_per_client=none",
        "federation.num_clients=3", "lora.ranks=[4]", "train.max_length=256", "eval.max_length=256",
        "train.precision='fp32'", "eval.precision='fp32'",
    )  # fmt: skip
    opts = RegimeOptions(overrides=overrides, out=str(tmp_path / "out"), uploads=str(tmp_path / "up"),
                         batches=(2, 4), examples=(4, 8), inits=("shared",), taus=(1.0, 0.9))  # fmt: skip
    results = run(opts)
    cells = results["cells"]
    assert sorted(cells) == sorted(f"batch{b}-examples{e}-shared" for b in (2, 4) for e in (4, 8))
    for c in cells.values():
        m = c["methods"]
        assert c["steps"] == c["examples"] // c["batch"]
        assert all(info["steps"] == c["steps"] for info in c["clients"].values())
        assert m["FLoRA"]["rel_error_vs_exact"] < 1e-5 and m["FLoRIST tau=1.00"]["rel_error_vs_exact"] < 1e-4
        assert m["FLoRIST tau=0.90"]["rank_total"] <= m["FLoRIST tau=1.00"]["rank_total"]
        assert m["FLoRIST tau=1.00"]["paired_vs_flora"]["mean"] == pytest.approx(0.0, abs=1e-4)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "up").rglob("*.safetensors")}
    assert run(opts)["cells"] == json.loads(json.dumps(cells))  # resumed: nothing trains again
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "up").rglob("*.safetensors")}
    other = replace(
        opts, overrides=(*overrides, "train.lr=0.05"), examples=(4, 8, 12)
    )  # a new cell, other lr
    with pytest.raises(
        ConfigError,
        match=r"results\.json holds results of another regime: train\.lr: 0\.001 there, 0\.05 now; pass",
    ):
        run(other)
    with pytest.raises(ConfigError, match=r"up/batch2-examples4-shared holds uploads trained under another "
                                          r"config: train\.examples: 8 there, 12 now; train\.lr: "):  # fmt: skip
        run(replace(other, out=str(tmp_path / "out-lr")))
    assert "FLoRIST tau=0.90" in write_report(opts)
    assert (tmp_path / "out" / "kept_rank.png").stat().st_size > 10_000
