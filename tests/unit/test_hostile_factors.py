"""A registered client that sends legal-looking but poisonous factors (issue: the new options
opened new holes), through the real codec and strategy: zero or cancelling B with a huge A, a
global that overflows only when rounded to a 16-bit wire, and FedIT's averaged factors."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from florist.lora import ClientUpdate, LoraFactors
from tests.unit.test_strategy_reliability import ROUND, N, dense, honest, reply, strategy


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, int]]:
    from florist.server.global_model import adapted_shapes
    from tests.peft_helpers import tiny_llama

    return adapted_shapes(tiny_llama(0), ("q_proj", "v_proj"))


FEDIT = ("aggregation.method='fedit'", "aggregation.tau=none")


def _zero_b(u: ClientUpdate, a: float) -> ClientUpdate:
    return replace(
        u,
        modules={
            n: LoraFactors(A=torch.full_like(f.A, a), B=torch.zeros_like(f.B)) for n, f in u.modules.items()
        },
    )


def _cancelling(u: ClientUpdate, a: float) -> ClientUpdate:
    """B = [b, b], A = [x; -x]: the product is exactly 0, every factor entry is huge or tiny."""
    modules = {}
    for n, f in u.modules.items():
        half = f.rank // 2
        b = torch.full((f.B.shape[0], 1), 1e-12)
        x = torch.full((1, f.A.shape[1]), a)
        modules[n] = LoraFactors(
            A=torch.cat([x.expand(half, -1), -x.expand(half, -1)]), B=b.expand(-1, 2 * half).clone()
        )
    return replace(u, modules=modules)


def _max_product(s: Any) -> float:
    _, result = s.server.history[-1]
    return max(float(f.delta(torch.float64).abs().max()) for f in result.global_update.values())


@pytest.mark.parametrize("method", ["florist", "flora", "fedit", "rblora", "fedex", "flexlora"])
@pytest.mark.parametrize("attack", [_zero_b, _cancelling])
@pytest.mark.parametrize("clip", ["none", "median"])
def test_a_huge_factor_behind_a_zero_product_is_refused(
    method: str, attack: Any, clip: str, shapes: dict[str, tuple[int, int]]
) -> None:
    if method == "fedex" and clip != "none":
        pytest.skip("aggregation.clip is refused for fedex by the config")
    tau = "aggregation.tau=1.0" if method == "florist" else "aggregation.tau=none"
    s = strategy(shapes, f"aggregation.method={method!r}", tau, f"aggregation.clip={clip!r}")
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    bad = attack(ups[N - 1], 3e37)
    s.aggregate_train(ROUND, [reply(u) for u in ups[:-1]] + [reply(bad)])
    log_ = s.logs[ROUND]
    assert log_.skipped is None
    assert "factor out of range" in log_.rejected[bad.client_id]
    assert sorted(log_.rejected) == [bad.client_id]  # no honest client is blamed
    honest_max = max(float(t.abs().max()) for t in dense(ups[:-1]).values())
    assert _max_product(s) < 10 * honest_max
    _, result = s.server.history[-1]
    assert all(float(f.A.abs().max()) < 1e4 for f in result.global_update.values())


def test_fedit_median_clipping_bounds_each_averaged_factor(shapes: dict[str, tuple[int, int]]) -> None:
    """An A inside the factor bound but 1000x the others': the product clip alone lets avg(A) carry it
    into avg(B) avg(A); the factor clip takes it to the median's scale."""
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    loud = replace(
        ups[-1], modules={n: replace(f, A=f.A * 1000, B=f.B / 1000) for n, f in ups[-1].modules.items()}
    )
    plain = strategy(shapes, *FEDIT)
    plain.aggregate_train(ROUND, [reply(u) for u in [*ups[:-1], loud]])
    robust = strategy(shapes, *FEDIT, "aggregation.clip='median'")
    robust.aggregate_train(ROUND, [reply(u) for u in [*ups[:-1], loud]])
    reference = strategy(shapes, *FEDIT)
    reference.aggregate_train(ROUND, [reply(u) for u in ups])
    assert _max_product(plain) > 20 * _max_product(reference)  # the hole: one client steers avg(A)
    assert _max_product(robust) < 3 * _max_product(reference)


def test_a_global_that_overflows_the_16_bit_wire_is_never_sent(
    shapes: dict[str, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite in float32, Inf once rounded to float16 (max 65504): the culprit is found by leaving
    each client out in turn, and what is sent is finite as rounded."""
    from florist.flower.codec import encode_upload

    s = strategy(shapes, "federation.wire_dtype='float16'")
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    cls = type(s.aggregator)
    real = cls.aggregate

    def grows(self: Any, updates: list[ClientUpdate], *, round: int | None = None) -> Any:
        result = real(self, updates, round=round)
        if any(u.client_id == "client-002" for u in updates):  # finite float32, beyond float16
            name = next(iter(result.global_update))
            f = result.global_update[name]
            result.global_update[name] = LoraFactors(A=f.A, B=f.B * 0 + 1e5)
        return result

    monkeypatch.setattr(cls, "aggregate", grows)

    def wire(u: ClientUpdate) -> Any:
        msg = reply(u)
        arrays, meta = encode_upload(u.modules, wire="float16")
        msg.content["lora"], msg.content["lora_meta"] = arrays, meta
        return msg

    s.aggregate_train(ROUND, [wire(u) for u in ups])
    log_ = s.logs[ROUND]
    assert log_.skipped is None
    assert "not finite (as rounded to the wire dtype)" in log_.rejected["client-002"]
    assert "without it the round aggregates" in log_.rejected["client-002"]
    _, result = s.server.history[-1]
    assert result.is_finite()
    assert all(bool(torch.isfinite(f.B.half()).all()) for f in result.global_update.values())


def test_cap_weights_water_fills_and_keeps_the_order() -> None:
    from florist.aggregation.robust import cap_weights

    ups = [ClientUpdate(f"c{k}", n, {}) for k, n in enumerate([1e9, 40.0, 20.0, 20.0])]
    capped = cap_weights(ups, 0.4)
    total = sum(u.num_examples for u in capped)
    p = [u.num_examples / total for u in capped]
    assert p == pytest.approx([0.4, 0.3, 0.15, 0.15])  # the rest keep their ratios 2 : 1 : 1
    assert total == pytest.approx(sum(u.num_examples for u in ups))
    assert [u.num_examples / total for u in cap_weights(ups, 0.1)] == pytest.approx([0.25] * 4)  # below 1/K
    honest_only = cap_weights(ups[1:], 0.6)
    assert [u.num_examples for u in honest_only] == pytest.approx(
        [40.0, 20.0, 20.0]
    )  # nobody over: unchanged


def test_one_client_cannot_take_over_the_aggregate(shapes: dict[str, tuple[int, int]]) -> None:
    """A client that declared 1e9 examples at hello and claims them: with federation.max_client_weight
    its weight is held at the cap; without it, it is the aggregate (p = 0.99999985)."""
    from tests.unit.test_strategy_reliability import ClientInfo, clients, config

    def run(*overrides: str) -> Any:
        from florist.flower.strategy import FederatedLoRA

        cfg = config(*overrides)
        infos = [ClientInfo(c.node_id, c.client_id, c.index, c.rank, 10**9 if c.index == 0 else c.num_examples)
                 for c in clients()]  # fmt: skip
        s = FederatedLoRA(cfg, cfg.aggregator(), infos, shapes)
        ups = [honest(shapes, k, common=1.0) for k in range(N)]
        s.aggregate_train(ROUND, [reply(ups[0], n=1e9), *[reply(u) for u in ups[1:]]])
        return s.server.history[-1][1].weights

    assert run()["client-000"] > 0.9999
    capped = run("federation.max_client_weight=0.25")
    assert capped["client-000"] == pytest.approx(0.25)
    assert sum(capped.values()) == pytest.approx(1.0)
