"""florist client-sweep end to end on a tiny random Llama and the skills set: both rounds for each
(init, K), FLoRA's download growing as K^2 and FedIT's as K, FLoRIST's kept rank, resume, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from florist.errors import ConfigError
from florist.lora.peft_io import read_adapter
from florist.studies.client_sweep import SweepOptions, run, write_report
from tests.flower_helpers import save_tiny_model

pytestmark = pytest.mark.integration


def test_client_sweep_counts_bytes_against_k_and_resumes(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    overrides = (
        f"model.name={str(model)!r}", "data.source='skills'", "data.test=none", "data.skills_train=6",
        "data.skills_test=2", "data.max_examples_per_client=none", "train.max_length=256",
        "train.precision='fp32'",
    )  # fmt: skip
    opts = SweepOptions(overrides=overrides, out=str(tmp_path / "out"), uploads=str(tmp_path / "up"),
                        counts=(2, 3), inits=("shared", "per_client"), total_examples=8, taus=(0.9,))  # fmt: skip
    results = run(opts)
    cells = results["cells"]
    assert sorted(cells) == sorted(f"{i}/K={k}/round={r}" for i in opts.inits for k in (2, 3) for r in (1, 2))
    upload = read_adapter(tmp_path / "up" / "shared-k02" / "round-1" / "client-000")
    per_rank = sum(
        4 * sum(f.shape) for f in upload.modules.values()
    )  # float32 bytes of one rank, all modules
    for c in cells.values():
        k, m = c["clients"], c["methods"]
        assert c["examples_per_client"] == 4  # max(batch 4, 8 // K)
        assert m["FLoRA"]["bytes_down"] == k * (16 * k) * per_rank  # R = 16 K to each of K clients
        assert m["FedIT"]["bytes_down"] == k * 16 * per_rank
        assert 0 < m["FLoRIST tau=0.90"]["rank_total"] <= 16 * k * len(upload.modules)
        assert 0 < m["FLoRIST tau=0.90"]["bytes_down"] <= m["FLoRA"]["bytes_down"]
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "up").rglob("*.safetensors")}
    again = run(opts)  # everything is on disk: nothing trains again, the same figures
    assert again["cells"] == json.loads(json.dumps(cells))
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "up").rglob("*.safetensors")}
    other = replace(opts, overrides=(*overrides, "train.lr=0.05"))  # another sweep: refused, nothing trains
    with pytest.raises(
        ConfigError,
        match=r"out/results\.json holds results of another regime: .*; training\.train\.lr: 0\.001 there, 0\.05 now;",
    ):
        run(other)
    with pytest.raises(
        ConfigError, match=r"up/shared-k02 holds uploads trained under another config: train\.lr"
    ):
        run(replace(other, out=str(tmp_path / "out-lr")))
    text = write_report(opts)
    assert "### Round 2" in text and "| shared | 3 |" in text
    assert (tmp_path / "out" / "bytes_vs_clients.png").stat().st_size > 10_000
