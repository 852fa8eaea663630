"""A loss-threshold membership-inference attack (Yeom et al. 2018): a row the model trained on tends to
have a lower loss than one it did not. The attacker guesses "member" below a threshold; over every
threshold, its best advantage is max (TPR - FPR), and its AUC is the chance that a random member has
a lower loss than a random non-member (ties count half). Both are 0.5 / 0 for a model that leaks
nothing about the rows (a private one, or one that never saw them)."""

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
    return AttackResult(auc, best, len(a), len(b))
