"""``florist export``: a run's adapter merged into its base (reloads with transformers, same logits as
the unmerged PeftModel) or re-compressed under a rank cap (equal to the dense truncation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as read_safetensors

from florist.cli import main
from florist.client.model import SMOLLM2_HUB_ID, published_name
from florist.lora import LoraFactors
from florist.lora.peft_io import BASE_FILE, read_adapter, write_adapter
from florist.server.global_model import adapted_shapes
from tests.flower_helpers import save_tiny_model
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE

pytestmark = pytest.mark.integration


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as ``florist run`` leaves it: RUN/adapter, a cumulative adapter of rank 12."""
    model = save_tiny_model(tmp_path / "tiny")
    shapes = adapted_shapes(tiny_llama(0, vocab_size=VOCAB_SIZE), ("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(3)
    decay = 0.6 ** torch.arange(12, dtype=torch.float32)  # a spectrum that falls off, as after rounds
    modules = {name: LoraFactors(A=torch.randn(12, n, generator=g), B=0.05 * torch.randn(m, 12, generator=g) * decay,
                                 scaling=0.5) for name, (m, n) in shapes.items()}  # fmt: skip
    run = tmp_path / "runs" / "florist-x"
    write_adapter(run / "adapter", modules, base_model=str(model))
    return run


def test_merge_reloads_with_transformers_and_matches_the_peft_model(run_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", "-o", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = read_adapter(run_dir / "adapter").base_model_name_or_path
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(run_dir / "adapter")
    ).eval()
    ids = torch.randint(0, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, rtol=1e-5, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert float((merged(ids).logits - plain).abs().max()) > 1e-4  # the adapter really is in there


def test_merge_loads_the_base_a_florist_run_trained_on_not_the_published_name(
    run_dir: Path, tmp_path: Path
) -> None:
    """The embedded SmolLM2's adapter names the hub id (what other tools load) while florist trained on
    its own conversion: ``florist_base.json`` says which, and ``--merge`` loads that one."""
    adapter = run_dir / "adapter"
    local = read_adapter(adapter).base_model_name_or_path
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/unreachable-hub-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / BASE_FILE).write_text(json.dumps({"model": local}))
    assert main(["export", str(run_dir), "--merge", "-o", str(tmp_path / "a")]) == 0
    assert main(["export", str(run_dir), "--merge", "--base", str(local), "-o", str(tmp_path / "b")]) == 0
    a, b = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (adapter / BASE_FILE).write_text("[1]")
    assert main(["export", str(run_dir), "--merge", "-o", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_the_embedded_models_adapters_name_its_hub_id() -> None:
    assert published_name("smollm2") == published_name("smollm2-135m-instruct") == SMOLLM2_HUB_ID
    assert published_name("/srv/models/llama") == "/srv/models/llama"
    assert published_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize(
    ("flags", "cap"),
    [(["--max-rank", "4"], 4), (["--tau", "0.9"], None), (["--max-rank", "6", "--tau", "0.99"], 6)],
)
def test_rank_cap_equals_the_dense_truncation(
    run_dir: Path, tmp_path: Path, flags: list[str], cap: int | None
) -> None:
    out = tmp_path / "capped"
    assert main(["export", str(run_dir), *flags, "-o", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    before = read_adapter(run_dir / "adapter").modules
    after = read_adapter(out).modules
    for name, f in before.items():
        dense = f.delta(torch.float64)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        p = after[name].rank
        assert p == report["modules"][name]["rank"] and (cap is None or p <= cap)
        best = (U[:, :p] * S[:p]) @ Vh[:p]  # Eckart-Young
        torch.testing.assert_close(after[name].delta(torch.float64), best, rtol=1e-4, atol=1e-6)
        kept = float(S[:p].square().sum() / S.square().sum())
        assert report["modules"][name]["energy_kept"] == pytest.approx(kept, rel=1e-6)
        if "--tau" in flags:
            tau = float(flags[flags.index("--tau") + 1])
            energy = (S.square().cumsum(0) / S.square().sum()).tolist()
            want = next(i + 1 for i, e in enumerate(energy) if e >= tau - 1e-9)
            assert p == min(want, cap or want)


def test_export_refuses_what_it_cannot_do(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(run_dir), "-o", str(tmp_path / "o")]) == 2
    assert "give --max-rank and/or --tau" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--max-rank", "2", "-o", str(tmp_path / "o")]) == 2
    assert "is neither a run directory" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--merge", "--max-rank", "2", "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_export_never_overwrites_the_adapter_it_reads(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    for out in (run_dir / "adapter", run_dir / "adapter" / "sub", run_dir):
        assert main(["export", str(run_dir), "--max-rank", "2", "-o", str(out), "--overwrite"]) == 2
        assert "the input adapter" in capsys.readouterr().err
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_merge_onto_a_base_of_other_shapes_exits_2_naming_the_module(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The adapter was trained on a tiny Llama of hidden size 32; a base of hidden size 48 is refused in
    one line before peft touches it (was a 32-line peft traceback)."""
    other = save_tiny_model(tmp_path / "wide", hidden_size=48, intermediate_size=64)
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", "--base", str(other), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in the adapter but (48, 48) in base model" in err, err
    assert not out.exists()
