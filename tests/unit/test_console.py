"""The console: florist's lines at INFO, other libraries' from WARNING up, Flower's INFO chatter dropped
from the simulation's stream, everything back with --verbose; a host's logging left alone."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from florist.console import setup_logging


@contextmanager
def fresh_root() -> Iterator[list[logging.LogRecord]]:
    """A root logger with no handlers, as in a fresh ``florist`` process; everything is put back after."""
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    saved, level, filters = root.handlers[:], root.level, flwr.filters[:]
    root.handlers.clear()
    seen: list[logging.LogRecord] = []
    try:
        yield seen
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        flwr.filters[:] = filters


def _emit(verbose: bool) -> list[str]:
    with fresh_root() as seen:
        setup_logging(verbose)
        logging.getLogger().handlers[0].emit = seen.append  # type: ignore[method-assign]
        logging.getLogger("florist.flower.strategy").info("ours")
        logging.getLogger("alembic.runtime").info("setup plugin alembic.autogenerate.schemas")
        other = logging.getLogger("thirdparty.library")  # a third party (Ray's own logger may not propagate)
        other.warning("a real warning")
        other.debug("library chatter")
    return [r.getMessage() for r in seen]


def test_default_console_shows_ours_and_warnings_only() -> None:
    assert _emit(False) == ["ours", "a real warning"]


def test_verbose_shows_everything() -> None:
    assert _emit(True) == [
        "ours",
        "setup plugin alembic.autogenerate.schemas",
        "a real warning",
        "library chatter",
    ]


def test_a_host_programs_logging_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    before = logging.getLogger().handlers[:]
    setup_logging(False)
    assert logging.getLogger().handlers == before  # pytest's caplog handler still there
    logging.getLogger("florist.x").warning("kept")
    assert "kept" in caplog.text


def test_flowers_info_is_dropped_and_its_warnings_kept() -> None:
    flwr = logging.getLogger("flwr")
    kept: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: kept.append(r.getMessage())  # type: ignore[method-assign]
    with fresh_root():
        setup_logging(False)
        flwr.addHandler(handler)
        flwr.info("Starting Flower Simulation")
        flwr.warning("DEPRECATED FEATURE: %s", "something else")
        flwr.debug("Registered 2 nodes")
        flwr.removeHandler(handler)
    assert kept == ["DEPRECATED FEATURE: something else"]


def test_the_simulation_stream_keeps_florists_lines_and_warnings_and_drops_flowers_chatter(
    tmp_path: Path,
) -> None:
    import io

    from florist.deploy.link import not_flower_chatter
    from florist.deploy.processes import LogFollower

    chatter = [
        "Using SuperLink: florist-simulation (127.0.0.1:4242)\n",
        "Successfully started run 2649402848463801022\n",
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
        "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
        "Successfully installed florist-app to /tmp/home/apps/florist.florist-app.0.1.0.46dcc9d8.\n",
        "\x1b[36m(ClientAppActor pid=11)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor\n",
    ]
    kept = [
        "INFO round 1: training on client-000, client-001\n",
        "\x1b[93mWARNING \x1b[0m:   a node did not answer\n",
        "\x1b[36m(ClientAppActor pid=11)\x1b[0m WARNING florist.client: 2 rows longer than train.max_length\n",
        "é ⚠️ a line with characters cut across two reads\n",
    ]
    log, out = tmp_path / "flwr-run.log", io.StringIO()
    follower = LogFollower(log, out, not_flower_chatter)
    data = "".join(chatter[:3] + kept[:2] + chatter[3:] + kept[2:]).encode()
    cut = data.index("⚠️".encode()) + 1  # inside a character, and inside a line
    with open(log, "wb") as f:
        f.write(data[:cut])
        f.flush()
        follower.pump()
        f.write(data[cut:] + b"no newline at the end")
    follower.pump(final=True)
    assert out.getvalue() == "".join(kept) + "no newline at the end"


def test_the_step_bar_outside_ray_is_plain_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from florist.client.progress import StepBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())  # drawn only on a terminal
    bar = StepBar(3, "client-000 round 1")
    for loss in (1.0, 0.5, 0.25):
        bar.step(loss)
    assert not bar.ray and bar.bar.n == 3
    bar.close()
