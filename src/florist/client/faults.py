"""Injected client faults ([faults] in the config), decided from seeds so a drill can be replayed.

drop_fraction = 0.3   each round, round(0.3 * N) of the N clients (a seeded sample of all clients)
                      fail when asked to train: the ClientApp raises ``InjectedFault`` after it has
                      received the global updates, as a node that crashes mid-round would.
slow_clients = [1]    client 1 sleeps ``slow_seconds`` before it replies (in ``slow_rounds``, or in
slow_seconds = 30     every round when that list is empty): a straggler.
"""

from __future__ import annotations

import logging
import random
import time

from florist.config.schema import FaultsConfig
from florist.errors import FloristError
from florist.seeds import derive_seed

log = logging.getLogger(__name__)


class InjectedFault(FloristError, RuntimeError):
    """A failure injected by ``[faults]``; never raised when the section is left at its defaults."""


def dropped_clients(faults: FaultsConfig, round: int, num_clients: int) -> list[int]:
    """Indices of the clients that fail in ``round`` (the same on every node and in tests)."""
    k = int(faults.drop_fraction * num_clients + 0.5)
    if k == 0:
        return []
    rng = random.Random(derive_seed(faults.seed, round, "drop"))
    return sorted(rng.sample(range(num_clients), k))


def is_slow(faults: FaultsConfig, round: int, index: int) -> bool:
    in_round = not faults.slow_rounds or round in faults.slow_rounds
    return faults.slow_seconds > 0 and index in faults.slow_clients and in_round


def before_reply(faults: FaultsConfig, round: int, index: int, num_clients: int) -> None:
    """Stall or fail as ``faults`` says for client ``index`` in ``round``; otherwise return at once."""
    if is_slow(faults, round, index):
        log.warning("client %d: injected delay of %.1f s in round %d", index, faults.slow_seconds, round)
        time.sleep(faults.slow_seconds)
    if index in dropped_clients(faults, round, num_clients):
        raise InjectedFault(f"client {index}: injected failure in round {round} (faults.drop_fraction)")
