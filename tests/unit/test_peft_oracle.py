"""peft's own ``add_weighted_adapter`` as a second oracle: ``cat`` for FLoRA, ``svd`` for FLoRIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from florist.aggregation import FixedRank, make_aggregator
from florist.lora.peft_io import read_adapter
from tests.helpers import assert_product_close
from tests.peft_helpers import tiny_llama, write_peft_client

RANKS = [8, 4, 2]
SIZES = [3.0, 1.0, 2.0]


@pytest.fixture
def clients(tmp_path: Path) -> list[Path]:
    return [write_peft_client(tiny_llama, tmp_path / f"c{k}", r, seed=k) for k, r in enumerate(RANKS)]


def _peft_combination(dirs: list[Path], combination: str, **kwargs: object) -> PeftModel:
    model = PeftModel.from_pretrained(tiny_llama(), str(dirs[0]), adapter_name="c0")
    for k, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"c{k}")
    weights = [s / sum(SIZES) for s in SIZES]
    names = [f"c{k}" for k in range(len(dirs))]
    model.add_weighted_adapter(names, weights, "combined", combination_type=combination, **kwargs)
    return model


def _ours(dirs: list[Path], method: str, **options: object) -> dict:  # type: ignore[type-arg]
    updates = [
        read_adapter(d).to_update(f"c{k}", n) for k, (d, n) in enumerate(zip(dirs, SIZES, strict=True))
    ]
    return make_aggregator(method, **options).aggregate(updates).global_update


def test_flora_equals_peft_cat(clients: list[Path]) -> None:
    peft_model = _peft_combination(clients, "cat")
    for name, f in _ours(clients, "flora").items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.r["combined"] == sum(RANKS)
        assert_product_close(f.delta(), layer.get_delta_weight("combined").detach(), rtol=1e-5)


@pytest.mark.parametrize("rank", [2, 5])
def test_florist_fixed_rank_equals_peft_svd(clients: list[Path], rank: int) -> None:
    peft_model = _peft_combination(clients, "svd", svd_rank=rank)
    for name, f in _ours(clients, "florist", policy=FixedRank(rank), dtype=torch.float64).items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert f.rank == rank
        assert_product_close(f.delta(), layer.get_delta_weight("combined").detach(), rtol=1e-4)
