"""``florist run`` refuses target modules the model lacks or florist cannot adapt, in one line and
before any process starts or any run directory is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from florist.cli import main
from florist.client.model import check_targets
from florist.config import load_config
from florist.errors import ConfigError
from tests.flower_helpers import save_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_targets_the_model_has_pass(llama: Path) -> None:
    check_targets(str(llama), ("q_proj", "v_proj"))
    check_targets(str(llama), ("self_attn.o_proj",))  # a suffix of the full name, as peft matches


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            ("q_proj", "nope_proj"),
            r"'nope_proj' matches no module of .*; its linear modules are \[.*'q_proj'",
        ),
        (
            ("mlp",),
            r"'mlp' matches LlamaMLP modules \(e\.g\. model\.layers\.0\.mlp\); florist adapts torch\.nn\.Linear",
        ),
        (("all-linear",), r"must list module names.*'all-linear' is not supported"),
    ],
)
def test_targets_it_lacks_or_cannot_adapt_are_named(
    llama: Path, targets: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_targets(str(llama), targets)


def test_gpt2_conv1d_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        ConfigError, match=r"'c_attn' matches Conv1D modules \(e\.g\. transformer\.h\.0\.attn\.c_attn\)"
    ):
        check_targets(str(tmp_path / "gpt2"), ("c_attn",))


def test_florist_run_stops_in_one_line_before_anything_starts(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "demo", f"model.name={str(llama)!r}", f"run.dir={str(tmp_path / 'runs')!r}",
            "lora.target_modules=['nope_proj']"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("florist run: error: lora.target_modules: 'nope_proj'")
    assert not (tmp_path / "runs").exists()


def test_florist_demo_makes_the_same_checks_before_it_starts(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", f"model.name={str(llama)!r}", f"run.dir={str(tmp_path / 'runs')!r}",
            "lora.target_modules=['nope_proj']"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("florist demo: error: lora.target_modules: 'nope_proj'")
    assert not (tmp_path / "runs").exists()


def test_a_baseline_spec_can_set_every_clients_rank() -> None:
    from florist.studies.variants import parse_baseline

    v = parse_baseline("fedsb+bf16+r64")
    assert v.name == "Fed-SB +bf16 +r64" and v.overrides()["lora.ranks"] == (64,)
    assert v.overrides()["federation.wire_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="unknown FLoRIST option"):
        parse_baseline("fedsb+r0")


def test_a_run_beyond_its_privacy_budget_is_refused_before_it_starts(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "demo", f"model.name={str(llama)!r}", f"run.dir={str(tmp_path / 'runs')!r}",
            "privacy.mode='client'", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=1.0",
            "lora.warm_start=false", "lora.warm_from='last'", "privacy.delta=1e-3"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "beyond privacy.target_epsilon = 1" in err[0] and "noise multiplier 0.3" in err[0]
    )
    assert not (tmp_path / "runs").exists()


def test_a_taken_run_directory_and_a_missing_gpu_stop_before_anything_starts(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "metrics.jsonl").write_text("{}\n")
    base = ["run", "demo", f"model.name={str(llama)!r}", f"run.dir={str(tmp_path / 'runs')!r}"]
    start = time.monotonic()
    assert main([*base, "run.name='taken'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not empty" in err[0] and time.monotonic() - start < 15
    assert (taken / "metrics.jsonl").read_text() == "{}\n"  # nothing written is lost
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*base, "model.device='cuda'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch sees no CUDA device" in err[0]


def test_an_unknown_data_format_is_refused_whatever_the_source() -> None:
    with pytest.raises(ConfigError, match=r"data.format must be one of .* got 'csv'"):
        load_config(None, ["data.format='csv'"])  # the embedded skills set


def test_a_packaged_config_without_its_data_says_how_to_point_at_a_copy(tmp_path: Path) -> None:
    from florist.data.federated import check_data

    cfg = load_config(None, ["data.source='../nowhere/dolly-8clients'", "data.split='presplit'",
                             "data.test='../nowhere/test.json'"])  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"does not exist, read from the current directory .*data.source=FOLDER"
    ):
        check_data(cfg.data, cfg.federation.num_clients)


def test_the_bench_refuses_an_unknown_rank_setting_before_it_trains(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--settings", "homogeneous,nope"]) == 2
    assert (
        "--settings takes homogeneous and heterogeneous, got ['homogeneous', 'nope']"
        in capsys.readouterr().err
    )
