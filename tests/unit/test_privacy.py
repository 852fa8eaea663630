"""Client-level DP: the factored clip against a dense float64 reference, the noise's std, the
accountant against the Gaussian mechanism's closed-form RDP, the optimal hard threshold, that the
aggregator sees only the noised mean, and the config's refusals."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from florist.aggregation import make_aggregator
from florist.aggregation.base import AggregationResult
from florist.aggregation.rank_policy import NoiseThreshold, hard_threshold
from florist.config import load_config
from florist.errors import ConfigError
from florist.lora import ClientUpdate, LoraFactors
from florist.privacy.accountant import ORDERS, Accountant, noise_for
from florist.privacy.client_level import (
    NOISED,
    change_norm,
    clip_change,
    noise_generator,
    noised_gradient_sum,
    noised_mean,
    noised_mean_factor,
)
from florist.server.round import aggregate_round

F64 = torch.float64
SHAPES = {"a": (20, 12), "b": (8, 12)}


def _update(cid: str, seed: int, rank: int = 3, scale: float = 1.0) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraFactors(
            A=torch.randn(rank, n, generator=g), B=scale * torch.randn(m, rank, generator=g), scaling=2.0
        )
        for name, (m, n) in SHAPES.items()
    }
    return ClientUpdate(cid, 10.0, modules)


def test_factored_clip_equals_the_dense_frobenius_clip() -> None:
    u = _update("c0", 1)
    dense = {n: f.delta(F64) for n, f in u.modules.items()}
    norm = math.sqrt(sum(float(d.square().sum()) for d in dense.values()))  # over all modules together
    assert change_norm(u) == pytest.approx(norm, rel=1e-12)
    clipped, seen = clip_change(u, norm / 4)
    assert seen == pytest.approx(norm, rel=1e-12)
    for name, d in dense.items():
        torch.testing.assert_close(clipped.modules[name].delta(F64), d / 4, rtol=1e-6, atol=1e-9)
    same, _ = clip_change(u, 2 * norm)  # within the bound: untouched
    assert same is u


def test_noised_mean_is_the_mean_of_clipped_changes_plus_noise_of_std_sigma_c_over_m() -> None:
    ups = [_update(f"c{k}", k) for k in range(4)]
    exact, std0 = noised_mean(ups, 5.0, 0.0, noise_generator(0, 1))
    for name in SHAPES:
        want = sum(clip_change(u, 5.0)[0].modules[name].delta(F64) for u in ups) / 4
        torch.testing.assert_close(exact.modules[name].delta(F64), want, rtol=1e-5, atol=1e-6)
    assert exact.client_id == NOISED and std0 == 0.0
    big = {"a": (300, 200)}
    zero = [ClientUpdate(u.client_id, 1.0, {"a": LoraFactors(A=torch.zeros(2, 200), B=torch.zeros(300, 2))})
            for u in ups]  # fmt: skip
    noised, std = noised_mean(zero, 2.0, 1.5, noise_generator(7, 3))
    assert std == pytest.approx(1.5 * 2.0 / 4)
    sample = noised.modules["a"].delta(F64)
    assert sample.shape == big["a"]
    assert float(sample.std()) == pytest.approx(std, rel=0.02)  # 60,000 draws
    assert abs(float(sample.mean())) < 4 * std / math.sqrt(sample.numel())
    again, _ = noised_mean(zero, 2.0, 1.5, noise_generator(7, 3))
    assert torch.equal(again.modules["a"].B, noised.modules["a"].B)  # a seed reproduces (not private)
    fresh, _ = noised_mean(zero, 2.0, 1.5, noise_generator(None, 3))
    assert not torch.equal(fresh.modules["a"].B, noised.modules["a"].B)  # OS randomness by default


def _closed_form(sigma: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism without sampling: RDP T alpha / (2 sigma^2) (Mironov 2017), converted
    with Balle et al. (2020)'s bound, the best order of the grid."""
    best = math.inf
    for a in ORDERS:
        rdp = rounds * a / (2 * sigma**2)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 10), (2.0, 50), (0.8, 3)])
def test_accountant_reproduces_the_gaussian_mechanisms_closed_form(sigma: float, rounds: int) -> None:
    assert Accountant(sigma, 1.0, 1e-5).epsilon(rounds) == pytest.approx(
        _closed_form(sigma, rounds, 1e-5), rel=1e-9
    )
    assert Accountant(sigma, 1.0, 1e-5).epsilon(0) == 0.0
    assert Accountant(0.0, 1.0, 1e-5).epsilon(1) == math.inf


def test_sampling_amplifies_and_calibration_meets_the_target() -> None:
    full, sampled = Accountant(1.0, 1.0, 1e-5).epsilon(20), Accountant(1.0, 0.1, 1e-5).epsilon(20)
    assert sampled < full / 3
    sigma = noise_for(3.0, 1e-5, 0.1, 50)
    assert Accountant(sigma, 0.1, 1e-5).epsilon(50) <= 3.0 < Accountant(sigma - 0.01, 0.1, 1e-5).epsilon(50)


def test_hard_threshold_and_the_noise_rule() -> None:
    assert hard_threshold(100, 100, 1.0) == pytest.approx(4 / math.sqrt(3) * 10)  # lambda*(1) = 4 / sqrt 3
    g = torch.Generator().manual_seed(0)
    m, n, nu = 120, 80, 0.05
    signal = sum(s * torch.randn(m, 1, generator=g, dtype=F64) @ torch.randn(1, n, generator=g, dtype=F64) / math.sqrt(m * n)
                 for s in (40.0, 25.0, 15.0))  # fmt: skip
    noisy = signal + nu * torch.randn(m, n, generator=g, dtype=F64)
    S = torch.linalg.svdvals(noisy)
    assert NoiseThreshold().ranks({"w": S}, {"w": (m, n)}, nu) == {"w": 3}
    pure = torch.linalg.svdvals(nu * torch.randn(m, n, generator=g, dtype=F64))
    assert NoiseThreshold().ranks({"w": pure}, {"w": (m, n)}, nu) == {"w": 1}  # nothing above: min_rank


def spy_on(agg: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The client ids of every call to ``agg``'s ``aggregate``, in order, as the calls happen."""
    seen: list[list[str]] = []
    original = type(agg).aggregate

    def spy(self, updates, *, round=None):  # type: ignore[no-untyped-def]
        seen.append([u.client_id for u in updates])
        return original(self, updates, round=round)

    monkeypatch.setattr(type(agg), "aggregate", spy)
    return seen


def test_the_aggregator_sees_only_the_noised_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.noise_seed=3",
                             "aggregation.rank_policy='noise'", "aggregation.tau=none", "federation.num_clients=4",
                             "lora.warm_start=false"])  # fmt: skip
    agg = cfg.aggregator()
    seen = spy_on(agg, monkeypatch)
    ups = [_update(f"c{k}", k, scale=0.01) for k in range(4)]
    out = aggregate_round(cfg, agg, 1, ups, [], {u.client_id: 3 for u in ups})
    assert seen == [[NOISED]] and out.result is not None
    assert [u.client_id for u in out.updates] == [NOISED] and out.updates[0].noise_std == pytest.approx(
        1.0 / 4
    )
    # the noise dominates these tiny changes: the noise rule keeps one direction per module
    assert set(out.result.ranks.values()) == {1}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.target_epsilon=0.0"], "target_epsilon must be > 0"),
        (["privacy.delta=1.0"], r"delta must be in \(0, 1\)"),
        (["privacy.clip=0.0"], "clip must be > 0"),
        (["privacy.mode='local'"], "privacy.mode must be one of"),
        (["privacy.mode='client'"], "needs privacy.noise_multiplier or privacy.target_epsilon"),
        (["privacy.mode='client'", "privacy.noise_multiplier=1.0", "aggregation.method='flexlora'", "aggregation.tau=none"],
         "not yet for 'flexlora'"),
        (["privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.delta=0.3"], "not below 1 / num_clients"),
        (["privacy.mode='client'", "privacy.noise_multiplier=0.5", "privacy.target_epsilon=1.0"],
         r"spend epsilon .* beyond privacy.target_epsilon = 1"),
        (["aggregation.rank_policy='noise'", "aggregation.tau=none"], "needs privacy.mode = 'client'"),
        (["privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0", "train.gradient_checkpointing=true"],
         "cannot use train.gradient_checkpointing"),
        (["privacy.mode='dp-sgd'"], "dp-sgd' needs privacy.noise_multiplier"),
    ],
)  # fmt: skip
def test_bad_privacy_settings_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["lora.warm_start=false", *overrides])


def test_a_target_epsilon_calibrates_the_noise() -> None:
    cfg = load_config(None, ["privacy.mode='client'", "privacy.target_epsilon=8.0", "federation.rounds=5",
                             "federation.num_clients=10", "federation.fraction=0.5"])  # fmt: skip
    acc = cfg.accountant()
    assert acc is not None and acc.q == 0.5 and acc.epsilon(5) <= 8.0
    assert make_aggregator("florist").name == "florist"


def test_the_calibration_and_the_epsilons_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server asks for the accountant every round: the second time, no RDP curve is computed
    again (a calibration is tens of curves), and the answers are the same numbers."""
    from opacus.accountants.analysis import rdp

    real, calls = rdp.compute_rdp, []
    monkeypatch.setattr(rdp, "compute_rdp", lambda **kw: calls.append(kw) or real(**kw))
    cfg = load_config(None, ["privacy.mode='client'", "privacy.target_epsilon=6.5", "federation.rounds=7",
                             "federation.num_clients=10", "federation.fraction=0.3"])  # fmt: skip
    first = cfg.accountant()
    assert first is not None and len(calls) > 5  # the bisection ran
    eps = first.epsilon(4)
    done = len(calls)
    again = cfg.accountant()
    assert again == first and again.epsilon(4) == eps and len(calls) == done


def test_factor_dp_is_the_start_plus_the_noised_mean_of_clipped_b_changes() -> None:
    """FFA-LoRA / FedSVD: the changes of B from the global the round began at, clipped over all
    modules, averaged with N(0, sigma^2 C^2) / m noise, added back to the start (dense reference)."""
    g = torch.Generator().manual_seed(4)
    A = {name: torch.randn(3, n, generator=g) for name, (m, n) in SHAPES.items()}
    start = {
        name: LoraFactors(A=A[name], B=torch.randn(m, 3, generator=g)) for name, (m, n) in SHAPES.items()
    }
    ups = [ClientUpdate(f"c{k}", 5.0, {name: LoraFactors(A=A[name], B=torch.randn(m, 3, generator=g), scaling=2.0)
                                       for name, (m, n) in SHAPES.items()}) for k in range(3)]  # fmt: skip
    out, std = noised_mean_factor(ups, start, 1.5, 0.0, noise_generator(0, 1))
    changes = [{n: 2.0 * u.modules[n].B.double() - start[n].B.double() for n in SHAPES} for u in ups]
    norms = [math.sqrt(sum(float(c[n].square().sum()) for n in SHAPES)) for c in changes]
    assert max(norms) > 1.5  # the bound bites
    for name in SHAPES:
        want = (
            start[name].B.double()
            + sum(c[name] * min(1.0, 1.5 / k) for c, k in zip(changes, norms, strict=True)) / 3
        )
        torch.testing.assert_close(out.modules[name].B.double(), want, rtol=1e-6, atol=1e-6)
        assert out.modules[name].A is A[name]
    assert std == 0.0 and out.client_id == NOISED
    _, std = noised_mean_factor(ups, None, 1.5, 2.0, noise_generator(1, 1))
    assert std == pytest.approx(2.0 * 1.5 / 3)


def test_ffa_under_client_dp_aggregates_only_the_noised_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.noise_seed=3",
                             "aggregation.method='ffa'", "aggregation.tau=none", "federation.num_clients=4",
                             "lora.warm_start=false", "lora.ranks=[3]"])  # fmt: skip
    agg = cfg.aggregator()
    seen = spy_on(agg, monkeypatch)
    g = torch.Generator().manual_seed(0)
    A = {name: torch.randn(3, n, generator=g) for name, (m, n) in SHAPES.items()}
    ups = [ClientUpdate(f"c{k}", 5.0, {name: LoraFactors(A=A[name], B=torch.randn(m, 3, generator=g))
                                       for name, (m, n) in SHAPES.items()}) for k in range(4)]  # fmt: skip
    out = aggregate_round(cfg, agg, 1, ups, [], {u.client_id: 3 for u in ups})
    assert seen == [[NOISED]] and out.result is not None
    with pytest.raises(ConfigError, match="needs one rank for every client"):
        load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=1.0", "aggregation.method='ffa'",
                           "aggregation.tau=none", "lora.warm_start=false", "federation.num_clients=2",
                           "lora.ranks=[4, 2]"])  # fmt: skip


def test_fedit_dp_averages_both_factors_from_the_shared_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """FedIT: DP-FedAvg on B and A together (one clip over both factors and all modules), round 1
    starting at the shared draw every client began from, rebuilt by the server from the seed."""
    from florist.aggregation.protocols import protocol_of
    from florist.client.lora_state import extract
    from florist.server.round import drawn_shapes, shared_draw
    from tests.unit.test_local_client import _clients

    clients = _clients("fedit", ranks=(4, 4))
    began = [extract(c.model) for c in clients]
    ups = [c.fit(1)[0] for c in clients]
    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=0.0", "privacy.clip=0.05",
                             "aggregation.method='fedit'", "federation.num_clients=2", "federation.seed=0",
                             "lora.warm_start=false", "lora.ranks=[4]"])  # fmt: skip
    start = shared_draw(cfg, drawn_shapes(cfg, ups), protocol_of(cfg.aggregator().protocol))
    for f0 in began:  # every client began at the server's rebuilt draw, B = 0
        for name, f in f0.items():
            assert torch.equal(f.A, start[name].A) and not start[name].B.any() and not f.B.any()
    agg = cfg.aggregator()
    seen = spy_on(agg, monkeypatch)
    out = aggregate_round(cfg, agg, 1, ups, [], {u.client_id: 4 for u in ups})
    assert seen == [[NOISED]] and out.result is not None
    changes = []  # the dense float64 reference: each client's (s B_k, A_k - A_0) as one vector
    for u in ups:
        changes.append({(n, w): (f.B.double() * f.scaling if w == "B" else f.A.double() - start[n].A.double())
                        for n, f in u.modules.items() for w in "BA"})  # fmt: skip
    norms = [math.sqrt(sum(float(t.square().sum()) for t in c.values())) for c in changes]
    assert min(norms) > 0.05  # the bound bites for both
    for name, g in out.result.global_update.items():
        for w, got in (("B", g.B.double() * g.scaling), ("A", g.A.double())):
            want = sum(c[(name, w)] * 0.05 / k for c, k in zip(changes, norms, strict=True)) / 2
            if w == "A":
                want = want + start[name].A.double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs the factors the round began from"):
        noised_mean_factor(ups, None, 1.0, 1.0, noise_generator(0, 1), with_a=True)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 3), (2.0, 20)])
def test_a_round_zero_with_every_client_is_one_more_unsampled_release(sigma: float, rounds: int) -> None:
    """Fed-SB's round 0 (every client, rate 1) composed with sampled rounds: at rate 1 it is exactly
    one more round of the closed form; at rate 0.1 it costs between nothing and a full round."""
    assert Accountant(sigma, 1.0, 1e-5, first=1).epsilon(rounds) == pytest.approx(
        _closed_form(sigma, rounds + 1, 1e-5), rel=1e-9
    )
    sampled, with_zero = Accountant(sigma, 0.1, 1e-5), Accountant(sigma, 0.1, 1e-5, first=1)
    assert (
        sampled.epsilon(rounds) < with_zero.epsilon(rounds) < Accountant(sigma, 1.0, 1e-5).epsilon(rounds + 1)
    )
    assert with_zero.epsilon(0) == pytest.approx(_closed_form(sigma, 1, 1e-5), rel=1e-9)
    target = noise_for(3.0, 1e-5, 0.1, rounds, first=1)
    assert Accountant(target, 0.1, 1e-5, first=1).epsilon(rounds) <= 3.0
    assert target > noise_for(3.0, 1e-5, 0.1, rounds)


def test_fedsb_round_zero_sees_only_the_clipped_noised_gradient_sum() -> None:
    g = torch.Generator().manual_seed(5)
    grads = [{name: k * torch.randn(m, n, generator=g) for name, (m, n) in SHAPES.items()} for k in (1, 2, 3)]
    norms = [math.sqrt(sum(float(t.double().square().sum()) for t in gr.values())) for gr in grads]
    out = noised_gradient_sum(grads, 25.0, 0.0, noise_generator(0, 0))
    assert min(norms) < 25.0 < max(norms)  # one within the bound, the others clipped
    for name in SHAPES:
        want = sum(gr[name].double() * min(1.0, 25.0 / k) for gr, k in zip(grads, norms, strict=True))
        torch.testing.assert_close(out[name], want, rtol=1e-12, atol=1e-12)
    noised = noised_gradient_sum(grads, 25.0, 0.5, noise_generator(1, 0))
    resid = torch.cat([(noised[n] - out[n]).flatten() for n in SHAPES])
    assert float(resid.std()) == pytest.approx(0.5 * 25.0, rel=0.1)  # sigma C per entry


def test_fedsb_under_client_dp_releases_the_noised_mean_core_on_the_servers_basis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each client's core change s R_k - R_start, clipped over all modules, averaged: the global
    update is B (R_start + mean clipped change) A (dense float64 product), the basis the server's."""
    from tests.unit.test_fedsb import SHAPES as FSB
    from tests.unit.test_fedsb import _basis, _updates

    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=0.0", "privacy.clip=1.0",
                             "aggregation.method='fedsb'", "federation.num_clients=3", "lora.ranks=[4]",
                             "lora.warm_start=false"])  # fmt: skip
    agg = cfg.aggregator()
    g = torch.Generator().manual_seed(2)
    start = {n: replace(f, core=torch.randn(4, 4, generator=g)) for n, f in _basis(4).items()}
    sent = AggregationResult(method="fedsb", protocol=agg.protocol, global_update=start)
    ups = _updates(4, (3.0, 1.0, 6.0))
    seen = spy_on(agg, monkeypatch)
    out = aggregate_round(cfg, agg, 1, ups, [sent], {u.client_id: 4 for u in ups})
    assert seen == [[NOISED]] and out.result is not None
    changes = [{n: 2.0 * u.modules[n].core.double() - start[n].core.double() for n in FSB} for u in ups]  # type: ignore[union-attr]
    norms = [math.sqrt(sum(float(c[n].square().sum()) for n in FSB)) for c in changes]
    assert min(norms) > 1.0  # the bound bites for every client
    for name, f in out.result.global_update.items():
        B, A = start[name].B.double(), start[name].A.double()
        core = start[name].core.double() + sum(c[name] / k for c, k in zip(changes, norms, strict=True)) / 3  # type: ignore[union-attr]
        torch.testing.assert_close(f.delta(F64), B @ core @ A, rtol=1e-5, atol=1e-6)
        assert torch.equal(f.B, start[name].B) and torch.equal(f.A, start[name].A)
    shapes = {n: (f.B.shape[0], f.A.shape[1]) for n, f in start.items()}
    empty = aggregate_round(cfg, agg, 1, [], [sent], {}, shapes)  # an empty sample: the start's core
    assert empty.result is not None and seen[-1] == [NOISED]
    for name, f in empty.result.global_update.items():
        assert f.core is not None and torch.equal(f.B, start[name].B) and torch.equal(f.A, start[name].A)
        torch.testing.assert_close(f.core, start[name].core)  # noise_multiplier 0 here: nothing added
    with pytest.raises(ConfigError, match="does not cover 'fedsb'"):
        load_config(None, ["privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0", "aggregation.method='fedsb'",
                           "lora.warm_start=false"])  # fmt: skip


def test_under_client_dp_the_clients_behind_the_noised_mean_hold_every_earlier_round() -> None:
    """The aggregator sees one noised update, but the clients whose changes went into it merged every
    earlier round: a merge-protocol client is owed only the rounds after, not all of them again."""
    from florist.server.federation import Member, Server

    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.noise_seed=1",
                             "aggregation.method='florist'", "federation.num_clients=3", "lora.warm_start=false",
                             "lora.ranks=[3]", "privacy.delta=1e-2"])  # fmt: skip
    server = Server(cfg, cfg.aggregator(), [Member(f"c{k}", k, 3) for k in range(3)])
    for t in (1, 2):
        ups = [_update(f"c{k}", 10 * t + k) for k in range(3)]
        assert server.round(t, ups).result is not None
    assert [sorted(server.owed(f"c{k}")) for k in range(3)] == [[2]] * 3


def _client_dp(*extra: str) -> Any:
    return load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=1.0", "lora.warm_start=false",
                              *extra])  # fmt: skip


def _server(cfg: Any) -> Any:
    from florist.server.federation import Member, Server

    n = cfg.federation.num_clients
    return Server(cfg, cfg.aggregator(), [Member(f"c{k}", k, 4) for k in range(n)])


def test_client_dp_samples_each_client_independently_from_secret_randomness() -> None:
    """A sample anybody can recompute from the config amplifies nothing: under client-level DP the
    round's clients are a Poisson sample from OS randomness (drawn once a round), reproducible only
    with the (not private) noise seed; without DP the seeded fixed-size sample stays."""
    cfg = _client_dp("federation.num_clients=30", "federation.fraction=0.2", "federation.rounds=40")
    a, b = _server(cfg), _server(cfg)
    draws = [[m.index for m in a.participants(t)] for t in range(1, 41)]
    assert draws == [[m.index for m in a.participants(t)] for t in range(1, 41)]  # once per round
    assert draws != [[m.index for m in b.participants(t)] for t in range(1, 41)]  # not from the config
    sizes = [len(d) for d in draws]
    assert len(set(sizes)) > 1 and 3.5 < sum(sizes) / len(sizes) < 8.5  # Poisson, mean 0.2 x 30 = 6
    seeded = _client_dp("federation.num_clients=30", "federation.fraction=0.2", "privacy.noise_seed=5")
    assert [m.index for m in _server(seeded).participants(3)] == [
        m.index for m in _server(seeded).participants(3)
    ]
    plain = load_config(None, ["federation.num_clients=30", "federation.fraction=0.2"])
    assert all(len(_server(plain).participants(t)) == 6 for t in (1, 2, 3))


def test_client_dp_divides_by_the_public_expected_count_not_the_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two of eight clients expected (fraction 0.25), three replied: the aggregate is the sum of the
    clipped changes over 2 (dense float64 product, no noise); a schedule divides by its own count and
    is accounted at rate 1."""
    cfg = _client_dp("federation.num_clients=8", "federation.fraction=0.25", "privacy.noise_multiplier=0.0",
                     "privacy.clip=3.0", "aggregation.tau=1.0")  # fmt: skip
    assert cfg.dp_denominator(1) == 2.0 and cfg.accountant().q == 0.25
    agg = cfg.aggregator()
    ups = [_update(f"c{k}", k) for k in range(3)]
    out = aggregate_round(cfg, agg, 1, ups, [], {u.client_id: 3 for u in ups})
    assert out.result is not None
    clipped = [clip_change(u, 3.0)[0] for u in ups]
    for name in SHAPES:
        want = sum(u.modules[name].delta(F64) for u in clipped) / 2
        got = out.result.global_update[name].delta(F64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sched = _client_dp(
        "federation.num_clients=4", "federation.rounds=2", "federation.participation=[[0, 1], [2]]"
    )
    assert sched.dp_denominator(1) == 2.0 and sched.dp_denominator(2) == 1.0 and sched.accountant().q == 1.0


def test_factor_dp_releases_the_servers_a_never_a_clients() -> None:
    g = torch.Generator().manual_seed(7)
    start = {
        name: LoraFactors(A=torch.randn(3, n, generator=g), B=torch.zeros(m, 3))
        for name, (m, n) in SHAPES.items()
    }
    forged = [ClientUpdate("c0", 1.0, {name: LoraFactors(A=torch.randn(3, n, generator=g), B=torch.randn(m, 3, generator=g))
                                       for name, (m, n) in SHAPES.items()})]  # fmt: skip
    out, _ = noised_mean_factor(forged, start, 1.0, 0.0, noise_generator(0, 1))
    for name in SHAPES:
        assert torch.equal(out.modules[name].A, start[name].A)


def test_fedsb_round_zero_under_client_dp_uses_only_public_numbers() -> None:
    common = ["aggregation.method='fedsb'", "aggregation.tau=none", "federation.num_clients=3",
              "aggregation.init_samples=30"]  # fmt: skip
    plain = load_config(None, [*common, "train.examples=8"])
    private = _client_dp(*common, "train.examples=8")
    assert plain.round_zero([5, 20, 75])[0] == [2, 6, 23]
    assert (
        private.round_zero([5, 20, 75]) == private.round_zero([1, 1, 1]) == ([10, 10, 10], private.init_lr(0))
    )
    with pytest.raises(ConfigError, match="round-0 step size may not depend on the clients' sizes"):
        _client_dp(*common, "train.epochs=1")
    with pytest.raises(ConfigError, match="needs federation.min_replies = 1"):
        _client_dp("federation.num_clients=4", "federation.min_replies=2")
    with pytest.raises(ConfigError, match="privacy.target_epsilon = 1e-06"):
        load_config(None, ["privacy.mode='client'", "privacy.target_epsilon=1e-6", "federation.rounds=50",
                           "lora.warm_start=false"])  # fmt: skip


def test_a_round_with_no_client_sampled_trains_nothing_in_the_bench() -> None:
    """Client-level DP's Poisson sample can be empty: the bench's round trains nobody (no division by
    a zero count of examples); the server then releases the noise alone."""
    import math

    from florist.studies.simulate import train_round

    updates, stats = train_round([], 1)
    assert updates == [] and math.isnan(stats["train_loss"])


def test_an_empty_sample_releases_the_noise_alone() -> None:
    """What the analysed mechanism releases when no client is sampled: Z / D on every module (products,
    the modules' m x n), the start plus Z / D on the averaged factors; never a skipped round."""
    noise, std = noised_mean([], 2.0, 1.5, noise_generator(7, 3), 4.0, {"a": (300, 200), "b": (8, 12)})
    assert std == pytest.approx(1.5 * 2.0 / 4) and sorted(noise.modules) == ["a", "b"]
    sample = noise.modules["a"].delta(F64)
    assert sample.shape == (300, 200) and noise.modules["b"].delta(F64).shape == (8, 12)
    assert float(sample.std()) == pytest.approx(std, rel=0.02)
    assert abs(float(sample.mean())) < 4 * std / math.sqrt(sample.numel())
    with pytest.raises(ValueError, match="needs the module shapes"):
        noised_mean([], 2.0, 1.5, noise_generator(7, 3), 4.0)
    g = torch.Generator().manual_seed(4)
    start = {
        "a": LoraFactors(A=torch.randn(3, 200, generator=g), B=torch.randn(300, 3, generator=g), scaling=2.0)
    }
    out, std = noised_mean_factor([], start, 2.0, 1.5, noise_generator(7, 3), denominator=4.0)
    resid = out.modules["a"].B.double() - 2.0 * start["a"].B.double()
    assert out.modules["a"].A is start["a"].A and float(resid.std()) == pytest.approx(std, rel=0.1)
    both, _ = noised_mean_factor([], start, 2.0, 1.5, noise_generator(7, 3), with_a=True, denominator=4.0)
    assert float((both.modules["a"].A - start["a"].A).double().std()) == pytest.approx(std, rel=0.05)
    with pytest.raises(ValueError, match="needs the start"):
        noised_mean_factor([], None, 2.0, 1.5, noise_generator(7, 3), denominator=4.0)


@pytest.mark.parametrize("method", ["florist", "flora", "ffa", "fedsvd", "fedit"])
def test_a_round_no_update_reached_is_aggregated_from_the_noise(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under client-level DP with the modules' shapes known (the server's model), a round with no
    update aggregates one noised update of the right shapes (round 1 of FedIT and FFA-LoRA: the
    shared draw's A at the federation's rank); without them the round is skipped as before."""
    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.noise_seed=3",
                             f"aggregation.method='{method}'", "aggregation.tau=none", "federation.num_clients=4",
                             "federation.fraction=0.5", "lora.warm_start=false", "lora.ranks=[3]"]
                      + (["aggregation.rank_policy='noise'"] if method == "florist" else []))  # fmt: skip
    agg = cfg.aggregator()
    seen = spy_on(agg, monkeypatch)
    out = aggregate_round(cfg, agg, 1, [], [], {}, SHAPES)
    assert seen == [[NOISED]] and out.result is not None and out.contributors == ()
    assert out.updates[0].noise_std == pytest.approx(cfg.privacy.clip / 2.0)  # D = 0.5 x 4, never 0
    for name, (m, n) in SHAPES.items():
        assert out.result.global_update[name].delta(F64).shape == (m, n)
        if not type(agg).products_only:  # B has the federation's rank
            assert out.updates[0].modules[name].B.shape == (m, 3)
    again = aggregate_round(cfg, agg, 2, [], [out.result], {}, SHAPES)  # and from the last result
    assert again.result is not None and seen[-1] == [NOISED]
    assert aggregate_round(cfg, agg, 1, [], [], {}, None).result is None
    from florist.server.federation import Member, Server

    members = [Member(f"c{k}", k, 3) for k in range(4)]
    assert Server(cfg, agg, members, shapes=SHAPES).min_updates() == 0  # a strategy without a model
    assert Server(cfg, agg, members).min_updates() == 1  # no shapes: the quorum, as before


@pytest.mark.parametrize("method", ["ffa", "fedsvd"])
def test_b_only_dp_releases_b_on_the_a_the_clients_trained_against(method: str) -> None:
    """FFA-LoRA and FedSVD under client-level DP, round 1: the released A is the frozen draw the
    clients hold (never sent; ``ClientRules.upload_a``), so with no noise and a bound that never bites
    the global update is the plain mean of the clients' s B_k A_k (dense float64 reference)."""
    from florist.client.lora_state import extract
    from tests.unit.test_local_client import _clients

    clients = _clients(method, ranks=(4, 4))
    ups = [c.fit(1)[0] for c in clients]
    held = [extract(c.model) for c in clients]
    cfg = load_config(None, ["privacy.mode='client'", "privacy.noise_multiplier=0.0", "privacy.clip=1e6",
                             f"aggregation.method='{method}'", "aggregation.tau=none", "federation.num_clients=2",
                             "federation.seed=0", "lora.warm_start=false", "lora.ranks=[4]"])  # fmt: skip
    out = aggregate_round(cfg, cfg.aggregator(), 1, ups, [], {u.client_id: 4 for u in ups})
    assert out.result is not None
    for name, g in out.result.global_update.items():
        for h in held:
            assert torch.equal(h[name].A, held[0][name].A)  # one frozen A for every client
        want = sum(h[name].delta(F64) for h in held) / 2
        assert float(want.abs().max()) > 0  # B trained
        torch.testing.assert_close(g.delta(F64), want, rtol=1e-5, atol=1e-7)
