"""Files a run leaves: normal modes, overwrite without a moment of no output, leftovers of a killed
writer cleaned, renames made durable. (Issue #11, item 10.)"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from florist import fsutil
from florist.lora.peft_io import write_adapter
from tests.helpers import make_updates


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_adapter_files_get_a_normal_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        d = write_adapter(tmp_path / "a", make_updates([2])[0].modules)
    finally:
        os.umask(old)
    assert _mode(d / "adapter_model.safetensors") == 0o644 == _mode(d / "adapter_config.json")
    assert _mode(d) == 0o755


def test_overwrite_swaps_in_one_step_and_keeps_nothing_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out"
    with fsutil.atomic_dir(dest) as tmp:
        (tmp / "v").write_text("1")
    moved: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (moved.append((str(a), str(b))), real(a, b))[1])
    with fsutil.atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (dest / "v").read_text() == "2"
    assert moved == [], "dest was moved away: there was a moment with no output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_falls_back_when_the_os_cannot_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    for v in "12":
        with fsutil.atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "v").write_text(v)
    assert (dest / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writer_leaves_leftovers_that_the_next_write_removes(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from florist import fsutil
        with fsutil.atomic_dir({str(dest)!r}) as tmp:
            (tmp / "half").write_text("x")
            print("ready", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "ready" in proc.stdout
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.tmp-"), left
    with fsutil.atomic_dir(dest) as tmp:
        (tmp / "v").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_writers_temporary_directory_is_left_alone(tmp_path: Path) -> None:
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"
    live.mkdir()
    fsutil.write_text_atomic(tmp_path / "out", "x")
    assert live.exists()


def test_figures_are_written_atomically(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fsutil.save_figure(fig, tmp_path / "f.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and _mode(tmp_path / "f.png") & 0o044


def test_results_shared_by_two_processes_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    code = textwrap.dedent(f"""
        import sys
        from florist.fsutil import update_json_atomic
        for i in range(40):
            update_json_atomic({str(path)!r}, f"{{sys.argv[1]}}-{{i}}", [i])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    import json

    data = json.loads(path.read_text())
    assert sorted(data) == sorted(f"{n}-{i}" for n in "ab" for i in range(40))
    assert data["b-39"] == [39]


def test_a_held_lock_is_refused_without_waiting_and_freed_when_released(tmp_path: Path) -> None:
    lock = tmp_path / "cell" / ".claim"
    with fsutil.file_lock(lock) as first:
        assert first
        with fsutil.file_lock(lock, wait=False) as second:  # another open file: flock refuses it
            assert second is False
    with fsutil.file_lock(lock, wait=False) as again:
        assert again
