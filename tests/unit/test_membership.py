"""The loss-threshold membership attack's AUC and advantage on hand-made losses."""

from __future__ import annotations

import pytest

from florist.eval.membership import loss_threshold_attack


def test_separable_losses_give_auc_one_and_full_advantage() -> None:
    r = loss_threshold_attack([0.1, 0.2, 0.3], [1.0, 2.0])
    assert r.auc == 1.0 and r.advantage == 1.0 and (r.members, r.non_members) == (3, 2)


def test_identical_losses_leak_nothing_and_nans_are_left_out() -> None:
    r = loss_threshold_attack([1.0, 2.0, float("nan")], [1.0, 2.0])
    assert r.auc == 0.5 and r.advantage == pytest.approx(0.0) and r.members == 2


def test_a_partial_overlap() -> None:
    r = loss_threshold_attack([1.0, 3.0], [2.0, 4.0])  # pairs won: (1<2) (1<4) (3<4) of 4
    assert r.auc == pytest.approx(0.75) and r.advantage == pytest.approx(0.5)
    with pytest.raises(ValueError):
        loss_threshold_attack([], [1.0])


def test_auc_interval_matches_the_spread_of_simulated_aucs() -> None:
    """Hanley & McNeil's Q1, Q2 are exact when the negated losses are exponential, so their standard
    error must match the spread of the AUC over many simulated attacks: members' losses -Exp(1),
    non-members' -Exp(3), A = P(Exp(1) > Exp(3)) = 3 / 4. (Swapping Q1 and Q2 is 4 % off here.)"""
    import random
    import statistics

    from florist.eval.membership import auc_interval

    rng = random.Random(0)
    n1, n2 = 40, 30
    aucs = []
    for _ in range(6000):
        members = [-rng.expovariate(1.0) for _ in range(n1)]
        others = [-rng.expovariate(3.0) for _ in range(n2)]
        aucs.append(sum(x < y for x in members for y in others) / (n1 * n2))  # loss_threshold_attack's AUC
    assert loss_threshold_attack(members, others).auc == aucs[-1]
    assert statistics.mean(aucs) == pytest.approx(0.75, abs=0.005)
    low, high = auc_interval(0.75, n1, n2)
    assert (high - low) / (2 * 1.959964) == pytest.approx(statistics.stdev(aucs), rel=0.025)
    assert auc_interval(0.99, 5, 5)[1] == 1.0  # clipped to [0, 1]
    r = loss_threshold_attack([0.1, 0.2, 0.3, 1.5], [1.0, 2.0])
    assert r.auc_low < r.auc < r.auc_high and r.describe().startswith(f"{r.auc:.3f} (")
    assert "no interval" in loss_threshold_attack([0.1], [1.0]).describe()
