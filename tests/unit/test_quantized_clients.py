"""A client on a 4-bit NF4 base (bitsandbytes' CPU backend): it trains its LoRA with the base frozen
as loaded (merge methods: ``test_held_updates.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from florist.client.local import client_from_config
from florist.client.lora_state import extract, lora_layers
from florist.client.model import load_client_model
from florist.config import load_config
from florist.data.federated import client_examples
from florist.errors import ConfigError
from tests.flower_helpers import save_tiny_model

pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (make install has it)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_an_nf4_client_trains_its_lora_on_a_frozen_4bit_base(model_dir: Path, precision: str) -> None:
    cfg = load_config(None, [f"model.name={str(model_dir)!r}", "model.quantization='nf4'", "aggregation.method='fedit'",
                             "aggregation.tau=none", "lora.warm_start=false", "federation.num_clients=2",
                             "data.skills_train=6", "data.skills_test=2", "train.steps=2", "train.batch_size=2",
                             f"train.precision={precision!r}"])  # fmt: skip
    model, tok = load_client_model(cfg)
    client = client_from_config(
        cfg, 0, model, tok, client_examples(cfg.data, 0, 2), cfg.aggregator().protocol
    )
    base = {name: layer.get_base_layer() for name, layer in lora_layers(client.model)}
    assert all(type(b).__name__ == "Linear4bit" for b in base.values())
    packed = {name: b.weight.detach().clone() for name, b in base.items()}
    before = extract(client.model)
    update, stats = client.fit(1)
    assert stats.steps == 2 and torch.isfinite(torch.tensor(stats.loss))
    for name, f in update.modules.items():
        assert float((f.B - before[name].B).abs().max()) > 0  # the LoRA trained
        assert torch.equal(base[name].weight.detach(), packed[name])  # the 4-bit base did not move
        assert type(base[name].weight).__name__ == "Params4bit"  # and was never cast to bf16


def test_an_unknown_quantization_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.quantization must be one of"):
        load_config(None, ["model.quantization='fp4'"])
