"""PEFT adapter directories: read what peft writes, write what peft loads, refuse what is unsafe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from florist.aggregation import EnergyThreshold, make_aggregator
from florist.errors import ConfigError, InvalidUpdate
from florist.lora import LoraFactors
from florist.lora.peft_io import read_adapter, write_adapter
from tests.helpers import assert_product_close
from tests.peft_helpers import ATTENTION, SMOLLM2_SHAPES, merged_weights, tiny_llama, write_peft_client


def _peft_delta(model_dir: Path, base_factory, name: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_factory(), str(model_dir))
    return model.base_model.model.get_submodule(name).get_delta_weight("default").detach()


@pytest.mark.parametrize(
    "lora",
    [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 7}}],
    ids=["plain", "rslora", "patterns"],
)
def test_read_matches_peft_delta_weights(tmp_path: Path, lora: dict) -> None:  # type: ignore[type-arg]
    path = write_peft_client(tiny_llama, tmp_path / "c", 4, seed=1, **lora)
    adapter = read_adapter(path)
    assert len(adapter.modules) == 4
    for name, f in adapter.modules.items():
        torch.testing.assert_close(f.delta(), _peft_delta(path, tiny_llama, name))


@pytest.mark.parametrize(
    ("factory", "targets"),
    [
        (tiny_llama, [*ATTENTION, "gate_proj", "up_proj", "down_proj"]),
        (lambda: tiny_llama(**SMOLLM2_SHAPES), ATTENTION),
    ],
    ids=["tiny-llama-all-modules", "smollm2-shapes"],
)
def test_global_adapter_round_trips_through_peft_merge(tmp_path: Path, factory, targets) -> None:  # type: ignore[no-untyped-def]
    dirs = [
        write_peft_client(factory, tmp_path / f"c{k}", r, seed=k, targets=targets)
        for k, r in enumerate([8, 4, 2])
    ]
    updates = [
        read_adapter(d).to_update(f"c{k}", n)
        for k, (d, n) in enumerate(zip(dirs, [3.0, 1.0, 2.0], strict=True))
    ]
    result = make_aggregator("florist", policy=EnergyThreshold(0.8)).aggregate(updates)
    assert len(set(result.ranks.values())) > 1, "per-module ranks should differ (rank_pattern is exercised)"
    out = write_adapter(tmp_path / "global", result.global_update)
    base = factory().state_dict()
    merged = merged_weights(factory(), out)
    for name, f in result.global_update.items():
        assert_product_close(merged[f"{name}.weight"] - base[f"{name}.weight"], f.delta(), rtol=1e-4)
    untouched = [k for k in base if not any(k.startswith(n) for n in result.global_update)]
    for key in untouched:
        torch.testing.assert_close(merged[key], base[key])


def test_write_keeps_an_explicit_scaling(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.self_attn.q_proj"
    f = LoraFactors(A=torch.randn(3, 32, generator=g), B=torch.randn(32, 3, generator=g), scaling=0.37)
    out = write_adapter(tmp_path / "a", {name: f})
    torch.testing.assert_close(_peft_delta(out, tiny_llama, name), f.delta())


def test_pickle_adapters_are_refused(tmp_path: Path) -> None:
    path = write_peft_client(tiny_llama, tmp_path / "c", 4, seed=0)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(
        ConfigError, match=r"adapter_model.bin' is a pickle file; florist reads safetensors only"
    ):
        read_adapter(path)


def _rewrite_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_rank_that_disagrees_with_the_config_is_named(tmp_path: Path) -> None:
    path = write_peft_client(tiny_llama, tmp_path / "c", 4, seed=0)
    _rewrite_config(path, r=8)
    with pytest.raises(
        InvalidUpdate,
        match=r"module 'model.layers.0.self_attn.q_proj': lora_A \(4, 32\) and lora_B \(32, 4\) disagree with the declared rank r=8",
    ):
        read_adapter(path, client="site-3")


def test_missing_b_is_named(tmp_path: Path) -> None:
    path = write_peft_client(tiny_llama, tmp_path / "c", 4, seed=0)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(
        InvalidUpdate,
        match=r"client 'site-3', module 'model.layers.1.self_attn.v_proj': lora_B.weight is missing",
    ):
        read_adapter(path, client="site-3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA adapters"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save \['lm_head'\] holds full weights"),
        ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
    ],
)
def test_unsupported_adapters_are_refused(tmp_path: Path, changes: dict, message: str) -> None:  # type: ignore[type-arg]
    path = write_peft_client(tiny_llama, tmp_path / "c", 4, seed=0)
    _rewrite_config(path, **changes)
    with pytest.raises(InvalidUpdate, match=message):
        read_adapter(path)


def test_missing_directory_and_config_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="adapter directory .*nowhere' does not exist"):
        read_adapter(tmp_path / "nowhere")
    path = write_peft_client(tiny_llama, tmp_path / "c", 4, seed=0)
    (path / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        read_adapter(path)


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "global"
    good = {"m": LoraFactors(A=torch.ones(2, 4), B=torch.ones(3, 2))}
    write_adapter(out, good)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="already exists"):
        write_adapter(out, good)
    with pytest.raises(ConfigError, match="refusing to write an adapter with no modules"):
        write_adapter(out, {}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global"], "no temporary directory left behind"
    shutil.rmtree(out)


def test_florists_records_beside_an_adapter_are_read_or_named_when_bad(tmp_path: Path) -> None:
    from florist.lora.peft_io import BASE_FILE, PROMPT_FILE, florist_base, florist_template

    assert florist_base(tmp_path) is None and florist_template(tmp_path) is None  # another tool's adapter
    (tmp_path / BASE_FILE).write_text('{"model": "smollm2"}')
    (tmp_path / PROMPT_FILE).write_text('{"template": "chat"}')
    assert florist_base(tmp_path) == "smollm2" and florist_template(tmp_path) == "chat"
    (tmp_path / BASE_FILE).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not florist's base record"):
        florist_base(tmp_path)
    (tmp_path / PROMPT_FILE).write_text('{"template": ""}')
    with pytest.raises(ConfigError, match="names no prompt template"):
        florist_template(tmp_path)
