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
