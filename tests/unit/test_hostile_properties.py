"""Property-based forgeries: hypothesis fills a registered client's reply with arbitrary field contents.

Whatever one client sends, the strategy returns, the global update is finite, memory stays bounded,
and when the forged client is left out the aggregate equals the honest clients' dense reference.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
import torch
from flwr.app import Array, Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.unit.test_strategy_reliability import (
    ROUND,
    N,
    assert_close_products,
    dense,
    honest,
    products,
    reply,
    strategy,
)

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.v_proj": (16, 32)}
FORGED = "client-002"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=40),
    st.booleans(),
)
values = st.one_of(
    scalars, st.lists(st.floats(allow_nan=True), max_size=4), st.lists(st.integers(-5, 5), max_size=4)
)
dtypes = st.one_of(
    st.sampled_from(["float32", "float64", "float16", "bfloat16", "int8", "uint16", "bool"]),
    st.text(max_size=12),
)
shapes = st.lists(st.integers(min_value=0, max_value=2**40), min_size=0, max_size=3).map(tuple)


def _set(record: Any, key: str, value: Any) -> None:
    try:
        record[key] = value
    except (TypeError, ValueError):
        assume(False)  # Flower itself would not carry this value


@st.composite
def forgeries(draw: st.DrawFn) -> tuple[str, Any]:
    """One field of the reply and its forged content."""
    where = draw(st.sampled_from(["metric", "meta", "array", "client"]))
    if where == "array":
        return where, (draw(dtypes), draw(shapes), draw(st.binary(max_size=4096)))
    return where, (
        draw(st.text(min_size=1, max_size=30) | st.sampled_from(["num-examples", "train_loss"])),
        draw(values),
    )


def _forge(msg: Message, where: str, what: Any, pick: int) -> Message:
    if where == "array":
        dtype, shape, data = what
        arrays = msg.content["lora"]
        key = sorted(arrays.keys())[pick % len(arrays)]
        try:
            arrays[key] = Array(dtype=dtype, shape=shape, stype=arrays[key].stype, data=data)
        except (TypeError, ValueError):
            assume(False)
        return msg
    key, value = what
    if where == "metric":
        _set(msg.content["metrics"], key, value)
    elif where == "meta":
        meta = msg.content["lora_meta"]
        _set(meta, sorted(meta.keys())[pick % len(meta)] if pick % 2 else key, value)
    else:
        _set(msg.content["client"], key, value)
    return msg


def _finite(result: Any) -> bool:
    return all(
        bool(torch.isfinite(f.B).all() and torch.isfinite(f.A).all()) for f in result.global_update.values()
    )


@pytest.fixture(scope="module")
def honest_updates() -> list[Any]:
    return [honest(SHAPES, k, common=1.0) for k in range(N)]


@SETTINGS
@given(forgery=forgeries(), pick=st.integers(0, 63))
def test_any_forged_field_leaves_the_server_up_and_the_honest_aggregate_intact(
    honest_updates: list[Any], forgery: tuple[str, Any], pick: int
) -> None:
    s = strategy(SHAPES)
    forged = _forge(reply(honest_updates[2]), *forgery, pick)
    replies = [reply(u) for u in honest_updates[:2]] + [forged] + [reply(u) for u in honest_updates[3:]]
    tracemalloc.start()
    try:
        s.aggregate_train(ROUND, replies)  # must not raise
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"aggregation of tiny updates peaked at {peak / 1e6:.0f} MB"
    assert s.logs[ROUND].skipped is None
    _, result = s.server.history[-1]
    assert _finite(result)
    if FORGED in s.logs[ROUND].rejected:
        assert_close_products(products(s), dense([u for u in honest_updates if u.client_id != FORGED]))


@SETTINGS
@given(scale=st.floats(min_value=1e-30, max_value=1e300), which=st.sampled_from(["A", "B", "scaling"]))
def test_any_magnitude_gives_a_finite_global_or_a_rejection(
    honest_updates: list[Any], scale: float, which: str
) -> None:
    from dataclasses import replace

    s = strategy(SHAPES)
    u = honest_updates[2]
    if which == "scaling":
        mods = {n: replace(f, scaling=f.scaling * scale) for n, f in u.modules.items()}
    else:
        mods = {n: replace(f, **{which: getattr(f, which) * scale}) for n, f in u.modules.items()}
    assume(all(bool(torch.isfinite(f.A).all() and torch.isfinite(f.B).all()) for f in mods.values()))
    replies = [reply(x) for x in honest_updates[:2]] + [reply(replace(u, modules=mods))]
    replies += [reply(x) for x in honest_updates[3:]]
    s.aggregate_train(ROUND, replies)
    _, result = s.server.history[-1]
    assert _finite(result)


@SETTINGS
@given(
    a=st.floats(min_value=1e-30, max_value=3e38),
    b=st.sampled_from([0.0, 1e-30, 1e-12]),
    cancel=st.booleans(),
    method=st.sampled_from(["florist", "flora", "fedit", "rblora", "flexlora"]),
    wire=st.sampled_from(["float32", "float16", "bfloat16"]),
    claimed=st.floats(min_value=1.0, max_value=1e9),
)
def test_zero_or_cancelling_b_with_any_a_any_wire_and_any_claimed_size(
    honest_updates: list[Any], a: float, b: float, cancel: bool, method: str, wire: str, claimed: float
) -> None:
    """The new fields: zero or cancelling B with A anywhere in float32's range, each 16-bit wire, and a
    claimed example count up to 1e9 under federation.max_client_weight: the round is never skipped,
    what is sent is finite as rounded to the wire, and the forged client holds at most the cap."""
    from dataclasses import replace

    from florist.flower.codec import encode_upload
    from florist.lora import LoraFactors

    tau = "aggregation.tau=1.0" if method == "florist" else "aggregation.tau=none"
    s = strategy(SHAPES, f"aggregation.method={method!r}", tau, f"federation.wire_dtype={wire!r}",
                 "federation.max_client_weight=0.3")  # fmt: skip
    u = honest_updates[2]
    mods = {}
    for n, f in u.modules.items():
        sign = torch.tensor([1.0, -1.0]).repeat(f.rank // 2) if cancel else torch.ones(f.rank)
        mods[n] = LoraFactors(A=torch.full_like(f.A, a) * sign[:, None], B=torch.full_like(f.B, b))
    forged = replace(u, modules=mods, num_examples=claimed)

    def sent(x: Any, n: float | None = None) -> Any:
        msg = reply(x, n=n)
        msg.content["lora"], msg.content["lora_meta"] = encode_upload(x.modules, wire=wire)
        return msg

    replies = [sent(x) for x in honest_updates[:2]] + [sent(forged, n=claimed)]
    replies += [sent(x) for x in honest_updates[3:]]
    s.aggregate_train(ROUND, replies)
    assert s.logs[ROUND].skipped is None
    _, result = s.server.history[-1]
    assert result.is_finite()
    assert result.weights.get(FORGED, 0.0) <= 0.3 + 1e-9
