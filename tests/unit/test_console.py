"""The console: florist's lines at INFO, other libraries' from WARNING up, Flower's deprecation notice
for the in-process simulation dropped, everything back with --verbose."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from florist.console import setup_logging


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    seen: list[logging.LogRecord] = []
    yield seen
    logging.getLogger("flwr").filters.clear()
    logging.basicConfig(force=True)


def _emit(verbose: bool, seen: list[logging.LogRecord]) -> list[str]:
    setup_logging(verbose)
    root = logging.getLogger().handlers[0]
    root.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("florist.flower.strategy").info("ours")
    logging.getLogger("alembic.runtime").info("setup plugin alembic.autogenerate.schemas")
    logging.getLogger("ray").warning("a real warning")
    logging.getLogger("ray").debug("ray chatter")
    return [r.getMessage() for r in seen]


def test_default_console_shows_ours_and_warnings_only(records: list[logging.LogRecord]) -> None:
    assert _emit(False, records) == ["ours", "a real warning"]


def test_verbose_shows_everything(records: list[logging.LogRecord]) -> None:
    assert _emit(True, records) == [
        "ours",
        "setup plugin alembic.autogenerate.schemas",
        "a real warning",
        "ray chatter",
    ]


def test_flowers_deprecation_of_run_simulation_is_dropped_and_other_warnings_kept(
    records: list[logging.LogRecord],
) -> None:
    setup_logging(False)
    flwr = logging.getLogger("flwr")
    kept: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: kept.append(r.getMessage())  # type: ignore[method-assign]
    flwr.addHandler(handler)
    try:
        flwr.warning(
            "DEPRECATED FEATURE: %s\n\n  removed later", "The `run_simulation` function is deprecated"
        )
        flwr.warning("DEPRECATED FEATURE: %s", "something else")
        flwr.debug("Registered 2 nodes")
    finally:
        flwr.removeHandler(handler)
    assert kept == ["DEPRECATED FEATURE: something else"]


def test_the_step_bar_outside_ray_is_plain_tqdm() -> None:
    from florist.client.progress import StepBar

    bar = StepBar(3, "client-000 round 1")
    for loss in (1.0, 0.5, 0.25):
        bar.step(loss)
    assert not bar.ray and bar.bar.n == 3
    bar.close()
