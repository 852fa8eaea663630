"""Every input a careless user (or a hostile file) can give the CLI: exit 2, one line naming the culprit,
nothing written or destroyed. One row per case of issue #11, items 7 to 9."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from florist.cli import main
from florist.config import load_config
from florist.errors import ConfigError
from florist.lora.peft_io import read_adapter, write_adapter
from tests.helpers import make_updates

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def clients(tmp_path: Path) -> list[Path]:
    dirs = []
    for u in make_updates([4, 4, 4]):
        d = write_adapter(tmp_path / u.client_id, u.modules)
        (d / "florist.json").write_text(json.dumps({"num_examples": u.num_examples}))
        dirs.append(d)
    return dirs


def _weights(data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / WEIGHTS).write_bytes(data)


def _truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        (d / CONFIG).write_text(json.dumps({**cfg, **changes}))

    return edit


def _text(name: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text(text)


def _scale_alpha(d: Path) -> None:
    cfg = json.loads((d / CONFIG).read_text())
    cfg["alpha_pattern"] = {k: 1e39 for k in cfg["alpha_pattern"]}
    (d / CONFIG).write_text(json.dumps(cfg))


FILE_CASES = {  # case -> (edit of client-1's directory, what stderr must say)
    "truncated safetensors": (_truncate, r"client-1/adapter_model.safetensors' is not a readable safetensors"),
    "random bytes": (_weights(os.urandom(333)), r"client-1/adapter_model.safetensors' is not a readable"),
    "empty safetensors": (_weights(b""), r"client-1/adapter_model.safetensors' is not a readable"),
    "huge header": (_weights(struct.pack("<Q", 2**60) + b"{}"), r"client-1/adapter_model.safetensors' is not a readable"),
    "lora_alpha 'big'": (_config(lora_alpha="big"), r"client-1/adapter_config.json': lora_alpha must be a finite number, got 'big'"),
    "rank_pattern regex": (_config(rank_pattern={"(": 4}), r"client-1/adapter_config.json': rank_pattern pattern '\(' is not a regex"),
    "config is a list": (_text(CONFIG, "[1, 2]"), r"client-1/adapter_config.json' must hold a JSON object, got list"),
    "config not JSON": (_text(CONFIG, "{"), r"client-1/adapter_config.json' is not valid JSON"),
    "florist.json not JSON": (_text("florist.json", "{oops"), r"client-1/florist.json' is not valid JSON"),
    "florist.json num_examples": (_text("florist.json", '{"num_examples": "many"}'), r"client-1/florist.json': num_examples must be a positive finite number"),
    "lora_alpha 1e39 (fedit)": (_scale_alpha, r"client '.*client-1', module '.*': factor out of range"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_bad_adapter_file_exits_2_naming_it(
    case: str, clients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, message = FILE_CASES[case]
    edit(clients[1])
    out = tmp_path / "global"
    method = ["--method", "fedit"] if "fedit" in case else []
    assert main(["aggregate", *map(str, clients), "-o", str(out), *method]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


FLAG_CASES = {
    "--budget-mb nan": (["--budget-mb", "nan"], r"argument --budget-mb: expected a finite number, got 'nan'"),
    "--budget-mb inf": (["--budget-mb", "inf"], r"argument --budget-mb: expected a finite number, got 'inf'"),
    "--budget-mb -1": (["--budget-mb", "-1"], r"budget_mb \(--budget-mb, aggregation.budget_mb\) must be > 0, got -1.0"),
    "--weights inf": (["--weights", "1,inf,2"], r"argument --weights: expected finite numbers"),
    "--weights negative": (["--weights", "1,-1,2"], r"--weights: the weight of '.*client-1' must be a positive finite number, got -1.0"),
    "--tau nan": (["--tau", "nan"], r"argument --tau: expected a finite number"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_a_bad_flag_exits_2_naming_it(
    case: str, clients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, message = FLAG_CASES[case]
    with pytest.raises(SystemExit) as info:  # argparse's own errors exit 2 as well
        code = main(["aggregate", *map(str, clients), "-o", str(tmp_path / "g"), *flags])
        raise SystemExit(code)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "g").exists()


def test_one_adapter_given_twice_is_refused(
    clients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "link"
    link.symlink_to(clients[0])
    for twice in ([str(clients[0]), str(clients[0]) + "/"], [str(clients[0]), str(link)]):
        assert main(["aggregate", *twice, str(clients[1]), "-o", str(tmp_path / "g")]) == 2
        assert "is the same directory as" in capsys.readouterr().err


def test_huge_weights_are_normalised_without_overflow(clients: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "g"
    assert (
        main(
            ["aggregate", *map(str, clients), "-o", str(out), "--weights", "1e308,1e308,1e308", "--tau", "1"]
        )
        == 0
    )
    report = json.loads((out / "florist_aggregation.json").read_text())
    assert [c["weight"] for c in report["clients"]] == pytest.approx([1 / 3] * 3)
    assert all(float(f.B.abs().max()) > 0 for f in read_adapter(out).modules.values())


def test_output_may_not_be_or_lie_inside_an_input(
    clients: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = (clients[0] / WEIGHTS).read_bytes()
    for out in (clients[0], clients[0] / "sub"):
        assert main(["aggregate", *map(str, clients), "-o", str(out), "--overwrite"]) == 2
        assert "is, or lies inside, the input adapter" in capsys.readouterr().err
    assert (clients[0] / WEIGHTS).read_bytes() == before and not (clients[0] / "sub").exists()
    assert main(["aggregate", *map(str, clients), "-o", str(clients[0].parent), "--overwrite"]) == 2
    assert "--overwrite would delete it" in capsys.readouterr().err


def test_unwritable_output_exits_2_naming_it(
    clients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["aggregate", *map(str, clients), "-o", str(blocker / "out")]) == 2
    assert "a-file" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["nan", "corrupt"])
def test_inspect_refuses_a_nan_or_corrupt_adapter(
    case: str, clients: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    if case == "corrupt":
        _truncate(clients[0])
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(clients[0] / WEIGHTS))
        next(iter(tensors.values()))[0, 0] = float("nan")
        save_file(tensors, str(clients[0] / WEIGHTS))
    assert main(["inspect", str(clients[0])]) == 2
    err = capsys.readouterr().err
    assert ("1 NaN" if case == "nan" else "is not a readable safetensors") in err


CONFIG_CASES = {
    "lora.dropout=7": "lora.dropout must be in [0, 1), got 7",
    "lora.alpha=-3": "lora.alpha must be a positive finite number, got -3",
    "data.alpha=-1": "data.alpha must be a positive finite number, got -1",
    "eval.batch_size=0": "eval.batch_size must be >= 1, got 0",
    "train.steps=-5": "train.steps must be positive, got -5",
    "federation.cpus_per_client=-1": "federation.cpus_per_client must be a positive finite number, got -1",
    "aggregation.budget_mb=nan": "budget_mb (--budget-mb, aggregation.budget_mb) must be > 0, got nan",
}


@pytest.mark.parametrize("override", sorted(CONFIG_CASES))
def test_out_of_range_config_values_are_refused_by_name(override: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(CONFIG_CASES[override])):
        load_config(None, [override])


def test_run_with_a_bad_value_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"[run]\ndir = {str(tmp_path / 'runs')!r}\n")
    assert main(["run", str(cfg), "aggregation.budget_mb=nan"]) == 2
    assert "budget" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_weights_in_python_api_are_checked() -> None:
    from florist.commands.aggregate import load_clients

    with pytest.raises(ConfigError, match="the weight of 'b' must be a positive finite number, got nan"):
        load_clients(["a", "b"], [1.0, float("nan")])
    assert torch.isfinite(torch.tensor(1.0))


def test_deploy_checks_the_presplit_folder_before_any_process_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from florist.deploy import command

    started: list[object] = []
    monkeypatch.setattr(command, "deploy", lambda *a, **k: started.append(a))
    data = tmp_path / "split"
    data.mkdir()
    for k in range(8):
        (data / f"client_{k}.json").write_text("[]")
    (tmp_path / "test.json").write_text("[]")
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"[data]\nsource = {str(data)!r}\nsplit = 'presplit'\ntest = {str(tmp_path / 'test.json')!r}\n"
        f"[run]\ndir = {str(tmp_path / 'runs')!r}\n"
    )
    assert main(["deploy", str(cfg), "--nodes", "3"]) == 2
    assert "holds 8 client files" in capsys.readouterr().err
    assert started == [] and not (tmp_path / "runs").exists()


def test_a_missing_model_directory_is_named() -> None:
    from florist.client.model import resolve_model

    with pytest.raises(ConfigError, match="model.name '/no/such/model' is not a model directory"):
        resolve_model("/no/such/model")
    assert resolve_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"  # a hub id passes through


def test_the_run_directory_is_created_only_when_asked(tmp_path: Path) -> None:
    from florist.server.rundir import RunDir

    cfg = load_config(None, [f"run.dir={str(tmp_path / 'runs')!r}", "run.name='r'"])
    rundir = RunDir(cfg, "base")
    assert not (tmp_path / "runs").exists()
    rundir.create()
    assert (tmp_path / "runs" / "r" / "config.toml").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--total-examples", "0"], r"--total-examples must be >= 1, got 0"),
        (["--counts", "4,0"], r"--counts must be client counts >= 1, got \[4, 0\]"),
        (["--counts", "4,x"], r"expected comma-separated integers"),
    ],
)
def test_client_sweep_refuses_bad_counts_before_training(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        raise SystemExit(
            main(["client-sweep", "--out", str(tmp_path / "o"), "--uploads", str(tmp_path / "u"), *flags])
        )
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "u").exists()


def test_the_cli_parses_without_the_deployment_stack() -> None:
    """``florist bench`` and the rest parse on a machine without cryptography or flwr (a GPU box with
    its own packages, say): the deploy command imports its TLS stack only when a deployment starts."""
    code = (
        "import sys\n"
        "for m in ('cryptography', 'flwr'): sys.modules[m] = None\n"
        "from florist.cli import parse_args\n"
        "args, _ = parse_args(['bench', '--report-only', '--out', 'x'])\n"
        "print(args.command if hasattr(args, 'command') else 'parsed')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_aggregate_refuses_adapters_of_different_base_models(
    clients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a warning, and the output named the first base: now exit 2 naming both, nothing written."""
    cfg_path = clients[2] / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "some-org/another-model"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "g"
    assert main(["aggregate", *map(str, clients), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'some-org/another-model'" in err and "different bases" in err
    assert not out.exists()
