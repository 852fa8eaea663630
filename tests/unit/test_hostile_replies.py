"""Replies checked on their metadata before any array is decoded; metrics and client text bounded."""

from __future__ import annotations

import logging
import tracemalloc
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from florist.flower import codec
from tests.unit.test_strategy_reliability import ROUND, N, honest, reply, strategy


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, int]]:
    from florist.server.global_model import adapted_shapes
    from tests.peft_helpers import tiny_llama

    return adapted_shapes(tiny_llama(0), ("q_proj", "v_proj"))


def _fake_modules(count: int, elements: int) -> ArrayRecord:
    data = np.zeros(elements, dtype=np.float32)
    return ArrayRecord(array_dict={f"model.fake.{i}.lora_A": Array(data) for i in range(count)})


@pytest.mark.parametrize(("count", "elements"), [(4, 5_000_000), (50_000, 0)])
def test_fake_modules_are_refused_before_anything_is_decoded(
    count: int, elements: int, shapes: dict[str, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 80 MB reply of fake modules, or 50,000 empty arrays: refused on their names, nothing decoded."""
    decoded: list[Any] = []
    real = codec._tensor
    monkeypatch.setattr(codec, "_tensor", lambda a: decoded.append(a) or real(a))
    s = strategy(shapes, "federation.max_message_mb=200")
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    bad = reply(ups[1])
    bad.content["lora"] = _fake_modules(count, elements)
    tracemalloc.start()
    s.aggregate_train(ROUND, [reply(ups[0]), bad, *[reply(u) for u in ups[2:]]])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "unexpected array 'model.fake." in s.logs[ROUND].rejected["client-001"]
    assert len(decoded) == 2 * len(shapes) * (N - 1)  # the honest clients' arrays only
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB: the fake arrays were copied"


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({f"k{i}": 1.0 for i in range(20_000)}, "20002 metrics in the reply; at most 16"),
        ({"train_loss": 1e308}, "metric 'train_loss' = 1e+308 is beyond 1e+15"),
        ({"\x1b[31mred": 1.0}, "is not accepted"),
    ],
)
def test_metrics_are_bounded_in_count_name_and_value(
    metrics: dict[str, float], why: str, shapes: dict[str, tuple[int, int]]
) -> None:
    s = strategy(shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    bad = reply(ups[1])
    bad.content["metrics"] = MetricRecord({"num-examples": 20.0, "train_loss": 1.0, **metrics})
    s.aggregate_train(ROUND, [reply(ups[0]), bad, *[reply(u) for u in ups[2:]]])
    assert why in s.logs[ROUND].rejected["client-001"]
    assert "client-001" not in s.logs[ROUND].client_metrics


def test_a_client_error_text_reaches_the_log_as_one_escaped_line(
    shapes: dict[str, tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.app import Error, Message

    caplog.set_level(logging.WARNING)
    s = strategy(shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    bad = reply(ups[1])
    err = Message(error=Error(code=1, reason="boom\n\x1b[2J\nINFO round 1: everything is fine" + "x" * 5000),
                  metadata=bad.metadata)  # fmt: skip
    s.aggregate_train(ROUND, [reply(ups[0]), err, *[reply(u) for u in ups[2:]]])
    reason = s.logs[ROUND].rejected["client-001"]
    assert "\n" not in reason and "\x1b" not in reason and len(reason) < 400
    assert "boom\\n\\x1b[2J" in reason
    logged = [r.getMessage() for r in caplog.records if "client-001 left out" in r.getMessage()]
    assert logged and all("\n" not in line and "\x1b" not in line for line in logged)
