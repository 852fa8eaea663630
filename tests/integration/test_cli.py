"""``florist aggregate`` and ``florist inspect`` end to end on adapters written by peft itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florist.cli import main
from florist.lora.peft_io import read_adapter
from tests.helpers import assert_product_close
from tests.peft_helpers import merged_weights, tiny_llama, write_peft_client

pytestmark = pytest.mark.integration
RANKS = [8, 4, 2]


@pytest.fixture
def client_dirs(tmp_path: Path) -> list[str]:
    dirs = []
    for k, r in enumerate(RANKS):
        d = write_peft_client(tiny_llama, tmp_path / f"site{k}", r, seed=k, use_rslora=k == 1)
        (d / "florist.json").write_text(json.dumps({"num_examples": [100, 300, 600][k]}))
        dirs.append(str(d))
    return dirs


def _dense(dirs: list[str], weights: list[float], name: str) -> torch.Tensor:
    total = sum(weights)
    return sum(
        w / total * read_adapter(d).modules[name].delta(torch.float64)
        for d, w in zip(dirs, weights, strict=True)
    )


def test_aggregate_tau_one_merges_to_the_exact_aggregate(
    client_dirs: list[str], tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "global"
    assert main(["aggregate", *client_dirs, "-o", str(out), "--method", "florist", "--tau", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "efficiency" in printed
    report = json.loads((out / "florist_aggregation.json").read_text())
    assert [c["weight"] for c in report["clients"]] == pytest.approx([0.1, 0.3, 0.6])
    base, merged = tiny_llama().state_dict(), merged_weights(tiny_llama(), out)
    for name in report["modules"]:
        assert_product_close(
            merged[f"{name}.weight"] - base[f"{name}.weight"],
            _dense(client_dirs, [100, 300, 600], name),
            1e-4,
        )


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_exact_baselines_merge_to_the_exact_aggregate(
    method: str, client_dirs: list[str], tmp_path: Path
) -> None:
    """``florist aggregate --method fedex`` (and flora): the written adapter, merged with peft, is the
    exact weighted sum, at a rank within the bound each method states."""
    out = tmp_path / "global"
    assert main(["aggregate", *client_dirs, "-o", str(out), "--method", method]) == 0
    report = json.loads((out / "florist_aggregation.json").read_text())
    base, merged = tiny_llama().state_dict(), merged_weights(tiny_llama(), out)
    for name, module in report["modules"].items():
        assert_product_close(
            merged[f"{name}.weight"] - base[f"{name}.weight"],
            _dense(client_dirs, [100, 300, 600], name),
            1e-4,
        )
        assert module["rank"] <= sum(RANKS) + (2 * max(RANKS) if method == "fedex" else 0)


def test_weights_flag_overrides_sidecars_and_budget_fits(client_dirs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "global"
    args = ["aggregate", *client_dirs, "-o", str(out), "--budget-mb", "0.004", "--weights", "1,1,2", "--json"]
    assert main(args) == 0
    report = json.loads((out / "florist_aggregation.json").read_text())
    assert [c["weight"] for c in report["clients"]] == pytest.approx([0.25, 0.25, 0.5])
    per_client = report["downlink_bytes"] / len(client_dirs)
    assert per_client <= 4000
    assert per_client == sum(m["rank"] * sum(m["shape"]) * 4 for m in report["modules"].values())


def test_flexlora_writes_each_clients_own_adapter(client_dirs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "global"
    assert main(["aggregate", *client_dirs, "-o", str(out), "--method", "flexlora"]) == 0
    for k, r in enumerate(RANKS):
        adapter = read_adapter(out / "per_client" / f"site{k}")
        assert {f.rank for f in adapter.modules.values()} == {r}


def test_inspect_prints_spectrum(client_dirs: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", client_dirs[0], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [m["rank"] for m in info["modules"]] == [8] * 4
    for m in info["modules"]:
        assert len(m["singular_values"]) == 8 and m["rank_90"] <= m["rank_99"] <= 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "1,2"], "--weights has 2 values for 3 adapter directories"),
        (
            ["--weights", "1,0,2"],
            r"--weights: the weight of '.*site1' must be a positive finite number, got 0.0",
        ),
        (
            ["--method", "fedit", "--tau", "0.5"],
            "--tau, --rank and --budget-mb apply to --method florist, not 'fedit'",
        ),
        (["--tau", "1.5"], r"tau must be in \(0, 1\], got 1.5"),
        (["--budget-mb", "0.0001"], "budget of 100 bytes is below"),
    ],
)
def test_errors_are_reported_and_nothing_is_written(
    client_dirs: list[str], tmp_path: Path, capsys, extra, message
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "global"
    assert main(["aggregate", *client_dirs, "-o", str(out), *extra]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".global")], "temporary output left behind"


def test_duplicate_directory_is_a_duplicate_client(client_dirs: list[str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["aggregate", client_dirs[0], client_dirs[0], "-o", str(tmp_path / "g")]) == 2
    assert "is the same directory as" in capsys.readouterr().err


def test_nan_client_is_named_and_existing_output_survives(
    client_dirs: list[str], tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    out = tmp_path / "global"
    assert main(["aggregate", *client_dirs, "-o", str(out)]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    weights = Path(client_dirs[2]) / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    assert main(["aggregate", *client_dirs, "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "site2" in err and "model.layers.1.self_attn.q_proj" in err and "1 NaN" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_run_flags_and_overrides_mix_in_any_order(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from florist.cli import parse_args

    args, _ = parse_args(["run", "c.toml", "--resume", "a.b=1", "c.d=2", "--force"])
    assert (args.overrides, args.resume, args.force) == (["a.b=1", "c.d=2"], True, True)
    # resuming a run that has no checkpoint is refused before any runtime starts, naming the folder
    assert main(["run", "--resume", str(tmp_path / "none.toml")]) == 2
    config = tmp_path / "c.toml"
    config.write_text('[run]\nname = "gone"\n')
    assert main(["run", str(config), "--resume", f"run.dir={str(tmp_path)!r}"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "gone/checkpoints" in err and "nothing to resume" in err


def test_run_with_an_unknown_model_exits_2_and_leaves_no_run_directory(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "run.toml"
    cfg.write_text("[federation]\nnum_clients = 2\n")
    runs = tmp_path / "runs"
    args = ["run", str(cfg), "model.name='/no/such/model'", f"run.dir={str(runs)!r}", "run.name='x'"]
    assert main(args) == 2
    assert "model.name '/no/such/model' is not a model directory" in capsys.readouterr().err
    assert not runs.exists()


def test_fedsvd_aggregates_adapters_that_share_a_and_refuses_others(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``florist aggregate --method fedsvd``: adapters trained against one A (as FedSVD's clients
    are) merge to the exact weighted sum with orthonormal rows in the written A; adapters with their
    own A are refused in one line naming the client, nothing written."""
    from safetensors.torch import load_file, save_file

    dirs = []
    for k in range(2):
        d = write_peft_client(tiny_llama, tmp_path / f"site{k}", 4, seed=k)
        (d / "florist.json").write_text(json.dumps({"num_examples": [100, 300][k]}))
        dirs.append(str(d))
    refused = tmp_path / "refused"
    assert main(["aggregate", *dirs, "-o", str(refused), "--method", "fedsvd"]) == 2
    err = capsys.readouterr().err
    assert "FedSVD needs every client to keep the shared frozen A" in err and "site1" in err
    assert not refused.exists()
    first = load_file(str(Path(dirs[0]) / "adapter_model.safetensors"))
    path = Path(dirs[1]) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: first[k] if "lora_A" in k else v for k, v in tensors.items()}, str(path))
    out = tmp_path / "global"
    assert main(["aggregate", *dirs, "-o", str(out), "--method", "fedsvd"]) == 0
    report = json.loads((out / "florist_aggregation.json").read_text())
    base, merged = tiny_llama().state_dict(), merged_weights(tiny_llama(), out)
    for name in report["modules"]:
        assert_product_close(
            merged[f"{name}.weight"] - base[f"{name}.weight"], _dense(dirs, [100, 300], name), 1e-4
        )
        A = read_adapter(out).modules[name].A.to(torch.float64)
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_fedsb_refuses_peft_adapters_in_one_line(client_dirs: list[str], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A PEFT adapter has no core between its factors, so Fed-SB cannot aggregate it: one line, exit 2."""
    out = tmp_path / "global"
    assert main(["aggregate", *client_dirs, "-o", str(out), "--method", "fedsb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a PEFT LoRA has none" in err[0]
    assert not out.exists()
