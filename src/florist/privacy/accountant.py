"""The privacy accountant of client-level DP: the subsampled Gaussian mechanism composed over rounds,
with Opacus's RDP accountant (``opacus.accountants.analysis.rdp``: Mironov 2017 and the subsampled
RDP bound of Mironov, Talwar and Zhang 2019; the RDP-to-(epsilon, delta) conversion of Balle et al.
2020).

One round releases the noised sum of the sampled clients' clipped changes: a Gaussian mechanism of
noise multiplier sigma (noise std sigma C for sensitivity C, adding or removing one client) on a
Poisson sample of rate q = ``federation.fraction``: under client-level DP each client is in a round
independently with probability q, drawn from secret randomness (``Server.participants``), which is
the sampling this analysis amplifies by. A fixed schedule (``federation.participation``) is public
and gets q = 1; so does every client in every round.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # Opacus's default RDP orders


@dataclass(frozen=True)
class Accountant:
    """Epsilon after ``rounds`` rounds of noise multiplier ``sigma`` at sample rate ``q``, at ``delta``;
    ``first`` releases before them with every client in (q = 1, the same sigma: Fed-SB's round 0)."""

    sigma: float
    q: float
    delta: float
    first: int = 0

    def epsilon(self, rounds: int) -> float:
        """The (epsilon, delta) guarantee after ``rounds`` rounds (and the ``first`` releases); 0 before
        any, inf without noise."""
        return spent(self.sigma, self.q, self.delta, self.first, rounds)


@functools.lru_cache(maxsize=4096)
def spent(sigma: float, q: float, delta: float, first: int, rounds: int) -> float:
    """``Accountant(sigma, q, delta, first).epsilon(rounds)``, remembered: the server asks every round
    and a calibration asks tens of times, each an RDP curve over ``ORDERS`` (seconds at fractional
    orders); the answer is a pure function of the numbers."""
    if rounds <= 0 and first == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    from opacus.accountants.analysis import rdp

    with warnings.catch_warnings():  # opacus warns when the best order is at the grid's edge
        warnings.simplefilter("ignore")
        curve = 0.0
        for rate, steps in ((q, max(rounds, 0)), (1.0, first)):
            if steps:  # RDP composes by adding the curves
                curve = curve + rdp.compute_rdp(q=rate, noise_multiplier=sigma, steps=steps,
                                                orders=list(ORDERS))  # fmt: skip
        eps, _ = rdp.get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def noise_for(target_epsilon: float, delta: float, q: float, rounds: int, first: int = 0) -> float:
    """The smallest noise multiplier (to 0.01) whose ``rounds`` rounds at rate ``q`` (after ``first``
    at rate 1) stay within ``target_epsilon`` at ``delta`` (a bisection on ``Accountant.epsilon``)."""
    lo, hi = 0.0, 1.0
    while Accountant(hi, q, delta, first).epsilon(rounds) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if Accountant(mid, q, delta, first).epsilon(rounds) > target_epsilon else (lo, mid)
    return math.ceil(hi * 100) / 100
