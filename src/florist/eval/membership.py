"""A loss-threshold membership-inference attack (Yeom et al. 2018): a row the model trained on tends to
have a lower loss than one it did not. The attacker guesses "member" below a threshold; over every
threshold, its best advantage is max (TPR - FPR), and its AUC is the chance that a random member has
a lower loss than a random non-member (ties count half). Both are 0.5 / 0 for a model that leaks
nothing about the rows (a private one, or one that never saw them).

Members and non-members must come from one distribution, or the attack measures the difference
between them instead of membership (``florist.data.federated.client_left_out`` gives a client's own
never-trained rows); the best advantage over every threshold is biased upwards at small sizes (about
0.2 for 80 against 80 rows that nothing tells apart), so the AUC's interval is the number to read."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AttackResult:
    auc: float
    advantage: float
    members: int
    non_members: int
    auc_low: float = float("nan")  # 95 % interval of the AUC (Hanley & McNeil 1982)
    auc_high: float = float("nan")

    def describe(self) -> str:
        if self.auc_low == self.auc_high:
            return f"{self.auc:.3f} (every pair ordered alike: no interval)"
        return f"{self.auc:.3f} ({self.auc_low:.3f} to {self.auc_high:.3f})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loss_threshold_attack(member: Sequence[float], non_member: Sequence[float]) -> AttackResult:
    """The attack's AUC and best advantage from per-row losses (nan rows, unscored, are left out)."""
    a = [x for x in member if not math.isnan(x)]
    b = [x for x in non_member if not math.isnan(x)]
    if not a or not b:
        raise ValueError("the attack needs scored member and non-member rows")
    wins = sum((x < y) + 0.5 * (x == y) for x in a for y in b)
    auc = wins / (len(a) * len(b))
    best = 0.0
    for t in sorted(set(a) | set(b)):
        tpr = sum(x <= t for x in a) / len(a)
        fpr = sum(y <= t for y in b) / len(b)
        best = max(best, tpr - fpr)
    low, high = auc_interval(auc, len(a), len(b))
    return AttackResult(auc, best, len(a), len(b), low, high)


def auc_interval(auc: float, members: int, non_members: int, z: float = 1.959964) -> tuple[float, float]:
    """The AUC's normal-approximation 95 % interval from Hanley & McNeil's (1982) standard error,
    clipped to [0, 1]: ``Q1 = A / (2 - A)``, ``Q2 = 2 A^2 / (1 + A)``,
    ``SE^2 = (A (1 - A) + (n1 - 1)(Q1 - A^2) + (n2 - 1)(Q2 - A^2)) / (n1 n2)`` with n1 the members.
    Q1 and Q2 are exact when the negated losses are exponential (Hanley & McNeil's model), an
    approximation otherwise; at A = 0 or 1 the interval has no width (fully separated rows carry no
    spread to estimate), which ``AttackResult.describe`` says."""
    a, n1, n2 = auc, members, non_members
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(0.0, a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2))
    return max(0.0, a - z * se), min(1.0, a + z * se)


def calibrated(final: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-row scores of the reference-model attack (Carlini et al. 2022, "the loss ratio"): the
    final model's loss less the public base model's on the same row, so what a row is (easy or
    hard) cancels and what training did to it is left; nan where either is unscored."""
    return [f - b for f, b in zip(final, base, strict=True)]
