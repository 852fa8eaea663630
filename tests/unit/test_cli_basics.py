"""The command line's own manners: --version, a plain --help, and a reader that goes away."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from florist.cli import main


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("florist ") and len(out.split()) >= 2


def test_help_starts_with_what_florist_is_without_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Federated LoRA fine-tuning with FLoRIST aggregation." in out and "``" not in out


def test_florist_help_lists_every_command_and_loads_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from florist.cli import COMMANDS, main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "missing = [c for c in COMMANDS if c not in out.getvalue()]\n"
        "print(missing, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[] False", done.stdout + done.stderr


@pytest.mark.parametrize("command", ["run", "demo", "deploy", "config", "aggregate", "inspect", "export",
                                     "report", "compare", "bench", "regime", "client-sweep", "privacy-study"])  # fmt: skip
def test_every_commands_help_shows_its_own_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from florist.cli import COMMANDS

    assert command in COMMANDS
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: florist {command}") and COMMANDS[command][1] in " ".join(out.split())


@pytest.mark.parametrize("argv", [["config", "--json"], ["config"]])  # print(), and a Rich table
def test_a_closed_pipe_ends_quietly(argv: list[str]) -> None:
    """``florist config --json | head -1``: the reader closes the pipe; no traceback, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "florist.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_step_bars_only_on_a_terminal_and_never_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's step bar: drawn on a terminal, not into a log file (every redraw a line there),
    and not at all with ``run.progress = false``."""
    from florist.client import progress

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty, self.text = tty, ""

        def isatty(self) -> bool:
            return self.tty

        def write(self, s: str) -> int:
            self.text += s
            return len(s)

        def flush(self) -> None:
            pass

    for tty, enabled, drawn in ((True, True, True), (False, True, False), (True, False, False)):
        stream = Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress.StepBar(3, "client-000 round 1", enabled)
        for loss in (2.0, 1.5, 1.0):
            bar.step(loss)
        bar.close()
        assert ("client-000 round 1" in stream.text) == drawn, (tty, enabled)


def test_a_saved_config_names_its_run_directory_so_it_resumes(tmp_path: Path) -> None:
    """``florist run RUN/config.toml --resume``: an unnamed run's saved config holds the name it was
    given, so it points back at its own directory; a resume with no name says what it needs."""
    from florist.config import load_config
    from florist.errors import ConfigError
    from florist.flower.simulation import run_simulation
    from florist.server.rundir import RunDir

    cfg = load_config(None, [f"run.dir={str(tmp_path)!r}"])
    assert cfg.run.name is None
    run = RunDir(cfg, "base")
    run.create()
    saved = load_config(str(run.path / "config.toml"), ["run.resume=true"])
    assert saved.run.name == run.path.name and RunDir(saved, "base").path == run.path
    with pytest.raises(ConfigError, match="run.resume needs run.name"):
        run_simulation(load_config(None, [f"run.dir={str(tmp_path)!r}", "run.resume=true"]))


def test_inspect_takes_a_run_directory_as_export_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from florist.cli import main
    from tests.peft_helpers import tiny_llama, write_peft_client

    write_peft_client(tiny_llama, tmp_path / "run" / "adapter", 4, seed=0)
    assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    assert [m["rank"] for m in json.loads(capsys.readouterr().out)["modules"]] == [4] * 4
    assert main(["inspect", str(tmp_path)]) == 2
    assert (
        "is neither a run directory (with adapter/) nor a PEFT adapter directory" in capsys.readouterr().err
    )


def test_sparse_evaluations_are_not_drawn_as_measured_between() -> None:
    from florist.commands.report import line_style

    assert line_style([0, 1, 2, 3]) == "-"
    assert line_style([0, 2, 4]) == ":" and line_style([1, 2, 5]) == ":"
    assert line_style([3]) == "-"


def test_the_summary_tells_how_to_load_the_adapter_from_the_published_base(tmp_path: Path) -> None:
    from rich.console import Console

    from florist.tables import print_summary

    console = Console(record=True, width=200)
    summary = {"method": "florist", "rounds": 1, "rounds_skipped": [], "eval_before": None, "eval_after": None,
               "bytes_up": 1, "bytes_down": 1, "bytes_catchup": 0, "sync": {}, "run_dir": str(tmp_path),
               "adapter": "runs/x/adapter", "base_model": "/root/.cache/florist/smollm2",
               "published_base": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    print_summary(summary, console=console)
    text = console.export_text()
    assert "from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')" in text and ".cache" not in text


def test_the_rounds_table_and_the_summary_say_what_privacy_was_spent(tmp_path: Path) -> None:
    from rich.console import Console

    from florist.tables import print_summary

    rows = [{"round": 0}, {"round": 1, "clients": ["a", "b"], "train_loss": 2.0, "rank_total": 4, "bytes_up": 10,
             "bytes_down": 10, "bytes_catchup": 0, "client_metrics": {"a": {"epsilon": 0.5}, "b": {"epsilon": 0.75}}}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {"method": "fedit", "rounds": 1, "rounds_skipped": [], "eval_before": None, "eval_after": None,
               "bytes_up": 10, "bytes_down": 10, "bytes_catchup": 0, "sync": {}, "run_dir": str(tmp_path),
               "adapter": "runs/x/adapter", "base_model": "b"}  # fmt: skip
    console = Console(record=True, width=200)
    print_summary(summary, console=console)
    text = console.export_text()
    assert "epsilon" in text.splitlines()[1] + text.splitlines()[2] and "0.7500" in text
    assert "privacy: DP-SGD, the worst client's epsilon 0.75" in text
    summary["privacy"] = {"mode": "client", "epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.1, "clip": 0.5,
                          "sample_rate": 0.1}  # fmt: skip
    console = Console(record=True, width=200)
    print_summary(summary, console=console)
    assert (
        "privacy: client-level DP, epsilon 2.5 at delta 1e-05 (noise multiplier 1.1" in console.export_text()
    )
