"""florist bench end to end on a tiny random Llama and the skills set: every method, both rank
settings, the report files; round 1 is shared exactly (same uploads for every non-FFA method)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florist.bench.compare import Bench, BenchOptions
from tests.flower_helpers import save_tiny_model

pytestmark = pytest.mark.integration


def test_bench_writes_table_plots_and_picks(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    overrides = (
        f"model.name={str(model)!r}", "data.source='skills'", "data.split='dirichlet'", "data.test=none",
        "data.skills_train=6", "data.skills_test=2", "data.max_examples_per_client=none", "eval.mmlu=none",
        "federation.num_clients=3", "federation.rounds=2", "train.steps=1", "train.batch_size=2",
        "train.max_length=256", "eval.max_length=256", "lora.ranks=[4]",
    )  # fmt: skip
    opts = BenchOptions(overrides=overrides, out=str(tmp_path / "bench"), taus=(1.0, 0.8), hetero_taus=(0.9,))
    summary = Bench(opts).run()
    out = tmp_path / "bench"
    for name in ("table.md", "results.json", "summary.json", "ranks_heatmap.png", "spectrum.png",
                 "accuracy_bytes_homogeneous.png", "accuracy_bytes_heterogeneous.png"):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    base = results["homogeneous"].pop("base model (round 0)")
    assert [r["round"] for r in base] == [0] and base[0]["eval"]["heldout_loss"] > 0
    homo = results["homogeneous"]
    assert set(homo) == {"FedIT", "FLoRA", "FlexLoRA", "FFA-LoRA", "FLoRIST tau=1.00", "FLoRIST tau=0.80"} | {
        k for k in homo if k.startswith("FLoRIST budget=")
    }
    assert all(len(records) == 2 for records in homo.values())
    r1 = {name: records[0] for name, records in homo.items()}
    assert r1["FLoRA"]["rel_error_vs_exact"] < 1e-5 and r1["FLoRIST tau=1.00"]["rel_error_vs_exact"] < 1e-4
    assert r1["FedIT"]["rel_error_vs_exact"] > 1e-3
    assert (
        r1["FLoRIST tau=0.80"]["bytes_down"]
        < r1["FLoRIST tau=1.00"]["bytes_down"]
        < r1["FLoRA"]["bytes_down"]
    )
    assert r1["FLoRA"]["bytes_up"] == r1["FedIT"]["bytes_up"]  # the same shared round-1 uploads
    assert r1["FFA-LoRA"]["bytes_up"] < r1["FedIT"]["bytes_up"]  # FFA-LoRA uploads B only
    assert set(summary["picks"]) == {"homogeneous", "heterogeneous"}
    assert summary["picks"]["homogeneous"]["O"].startswith("FLoRIST tau=")
    table = (out / "table.md").read_text()
    assert "| FLoRA |" in table
    assert (
        f"| base model (round 0) | - | {base[0]['eval']['heldout_loss']:.4f} | - | 0 B | 0 B | 0 | - |"
        in table
    )
