"""FLoRIST's error feedback (``aggregation.error_feedback``): the server keeps what the rank cut
leaves out and adds it to the next round's aggregate before the SVD. Against dense float64 products:
one round with a carry, the telescoping sum over rounds (nothing is lost, only delayed), the round
path that carries it, the checkpoint, and the config's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from florist.aggregation import EnergyThreshold, make_aggregator
from florist.config import load_config
from florist.errors import ConfigError
from florist.lora import ClientUpdate, LoraFactors
from florist.server.checkpoint import ServerState, load_latest, save
from florist.server.round import aggregate_round

F64 = torch.float64
SHAPES = {"q": (10, 8), "v": (6, 8)}  # m, n <= the stack's width: the carried tail is never capped


def _round(seed: int, sizes: tuple[float, ...] = (3.0, 1.0, 2.0), rank: int = 4) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            f"c{k}",
            n,
            {
                name: LoraFactors(
                    A=torch.randn(rank, c, generator=g, dtype=F64),
                    B=torch.randn(m, rank, generator=g, dtype=F64),
                    scaling=2.0,
                )
                for name, (m, c) in SHAPES.items()
            },
        )
        for k, n in enumerate(sizes)
    ]


def _exact(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    total = sum(u.num_examples for u in updates)
    return {
        name: sum((u.num_examples / total) * u.modules[name].delta(F64) for u in updates) for name in SHAPES
    }  # type: ignore[misc]


def _dense(factors: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    return {name: f.delta(F64) for name, f in factors.items()}


def test_a_carried_tail_joins_the_next_aggregate_and_the_new_tail_is_what_the_cut_leaves() -> None:
    agg = make_aggregator("florist", policy=EnergyThreshold(0.6), dtype=F64, feedback=True)
    first = agg.aggregate(_round(0))
    assert first.residual is not None
    for name, exact in _exact(_round(0)).items():  # sent + tail == the exact aggregate
        torch.testing.assert_close(
            first.global_update[name].delta(F64) + first.residual[name].delta(F64), exact
        )
    second = type(agg)(policy=EnergyThreshold(0.6), dtype=F64, feedback=True, carry=first.residual).aggregate(
        _round(1)
    )
    assert second.residual is not None
    for name, exact in _exact(_round(1)).items():
        want = exact + first.residual[name].delta(F64)  # this round's aggregate + last round's tail
        got = second.global_update[name].delta(F64)
        U, S, Vh = torch.linalg.svd(want)
        p = second.global_update[name].rank
        torch.testing.assert_close(got, (U[:, :p] * S[:p]) @ Vh[:p], rtol=1e-9, atol=1e-10)  # Eckart-Young
        torch.testing.assert_close(got + second.residual[name].delta(F64), want, rtol=1e-9, atol=1e-10)
        assert p < min(SHAPES[name])  # the cut bites


def _energy_rank(S: torch.Tensor, tau: float) -> int:
    """The smallest p whose leading p singular values hold ``tau`` of the energy."""
    share = torch.cumsum(S**2, 0) / (S**2).sum()
    return int((share < tau).sum()) + 1


def test_the_fresh_feedback_rank_is_the_rounds_own_and_sends_the_carried_aggregates_leading_part() -> None:
    """``feedback_rank = "fresh"``: each matrix's rank is the tau rank of this round's exact aggregate
    alone (dense float64 SVD), the global update is the best approximation of that rank to aggregate +
    carry, and what is sent plus the new tail is still the whole of it."""
    cut = EnergyThreshold(0.2)  # round 1 leaves a large tail to carry
    first = make_aggregator("florist", policy=cut, dtype=F64, feedback=True).aggregate(_round(0))
    assert first.residual is not None
    results = {
        mode: make_aggregator("florist", policy=EnergyThreshold(0.6), dtype=F64, feedback=True,
                              carry=first.residual, feedback_rank=mode).aggregate(_round(1))
        for mode in ("total", "fresh")
    }  # fmt: skip
    fresh = results["fresh"]
    assert fresh.residual is not None
    for name, exact in _exact(_round(1)).items():
        want = exact + first.residual[name].delta(F64)
        p = _energy_rank(torch.linalg.svdvals(exact), 0.6)
        assert fresh.global_update[name].rank == p
        assert results["total"].global_update[name].rank == _energy_rank(torch.linalg.svdvals(want), 0.6)
        U, S, Vh = torch.linalg.svd(want)
        got = fresh.global_update[name].delta(F64)
        torch.testing.assert_close(got, (U[:, :p] * S[:p]) @ Vh[:p], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got + fresh.residual[name].delta(F64), want, rtol=1e-9, atol=1e-10)
    ranks = {mode: sum(f.rank for f in r.global_update.values()) for mode, r in results.items()}
    assert ranks["fresh"] < ranks["total"]  # the carry adds directions only when it is ranked too


def test_over_rounds_what_is_sent_plus_the_last_tail_is_every_exact_aggregate() -> None:
    for feedback in (True, False):
        agg = make_aggregator("florist", policy=EnergyThreshold(0.6), dtype=F64, feedback=feedback)
        sent = {name: torch.zeros(m, n, dtype=F64) for name, (m, n) in SHAPES.items()}
        exact = {name: torch.zeros(m, n, dtype=F64) for name, (m, n) in SHAPES.items()}
        carry = None
        for t in range(4):
            result = type(agg)(policy=agg.policy, dtype=F64, feedback=feedback, carry=carry).aggregate(
                _round(t)
            )
            carry = result.residual
            for name in SHAPES:
                sent[name] += result.global_update[name].delta(F64)
                exact[name] += _exact(_round(t))[name]
        if feedback:
            assert carry is not None
            for name in SHAPES:
                torch.testing.assert_close(
                    sent[name] + carry[name].delta(F64), exact[name], rtol=1e-9, atol=1e-9
                )
        else:  # without it, each round's tail is lost for good
            assert carry is None
            lost = sum(float((exact[n] - sent[n]).norm()) for n in SHAPES)
            assert lost > 0.1 * sum(float(exact[n].norm()) for n in SHAPES)


def test_the_server_round_carries_the_last_results_tail_and_the_checkpoint_keeps_it(tmp_path: Path) -> None:
    cfg = load_config(None, ["aggregation.method='florist'", "aggregation.tau=0.6", "aggregation.dtype='float64'",
                             "aggregation.error_feedback=true", "federation.num_clients=3",
                             "lora.warm_start=false", "lora.ranks=[4]"])  # fmt: skip
    agg = cfg.aggregator()
    ranks = {f"c{k}": 4 for k in range(3)}
    one = aggregate_round(cfg, agg, 1, _round(0), [], ranks).result
    assert one is not None and one.residual is not None
    two = aggregate_round(cfg, agg, 2, _round(1), [one], ranks).result
    assert two is not None
    for name, exact in _exact(_round(1)).items():
        want = exact + one.residual[name].delta(F64)
        assert two.residual is not None
        torch.testing.assert_close(two.global_update[name].delta(F64) + two.residual[name].delta(F64), want)
    save(tmp_path, ServerState(round=2, history=[(1, one), (2, two)]), cfg, keep=1)
    back = load_latest(tmp_path, cfg, force=False).history[-1][1]
    assert back.residual is not None
    for name, f in two.residual.items():  # as computed, float64 here: a resume carries the same tail
        assert torch.equal(back.residual[name].A, f.A) and torch.equal(back.residual[name].B, f.B)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["aggregation.method='flora'"], "'flora' does not take aggregation.error_feedback"),
        (["privacy.mode='client'", "privacy.noise_multiplier=1.0", "aggregation.rank_policy='noise'",
          "lora.warm_start=false"], "would carry the DP noise"),
    ],
)  # fmt: skip
def test_error_feedback_is_refused_where_it_means_nothing(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["aggregation.error_feedback=true", *overrides])


def test_the_fresh_feedback_rank_needs_error_feedback_and_reaches_the_aggregator() -> None:
    with pytest.raises(ConfigError, match=r"feedback_rank = 'fresh' ranks error feedback's carried"):
        load_config(None, ["aggregation.feedback_rank='fresh'"])
    with pytest.raises(ConfigError, match=r"feedback_rank must be one of \['total', 'fresh'\]"):
        load_config(None, ["aggregation.error_feedback=true", "aggregation.feedback_rank='new'"])
    cfg = load_config(None, ["aggregation.error_feedback=true", "aggregation.feedback_rank='fresh'"])
    assert cfg.aggregator().feedback_rank == "fresh"  # type: ignore[attr-defined]


def test_the_server_keeps_only_the_last_tail() -> None:
    from florist.server.federation import Member, Server

    cfg = load_config(None, ["aggregation.method='florist'", "aggregation.tau=0.6", "aggregation.dtype='float64'",
                             "aggregation.error_feedback=true", "federation.num_clients=3",
                             "lora.warm_start=false", "lora.ranks=[4]"])  # fmt: skip
    server = Server(cfg, cfg.aggregator(), [Member(f"c{k}", k, 4) for k in range(3)])
    for t in (1, 2, 3):
        assert server.round(t, _round(t)).result is not None
    assert [r.residual is not None for _, r in server.state.history] == [False, False, True]
