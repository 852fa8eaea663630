"""The federation's live state and the server's decisions, with no transport: the one home of what
was sent, what every client holds and the server's model. The Flower strategy and the in-process
bench both drive a ``Server``; neither keeps a copy of its state, and a checkpoint saves its
``state`` as it is.

    participants(t)          which clients train in round t (the schedule, a seeded sample, or under
                             client-level DP a secret Poisson sample)
    owed(client)             what it downloads before training: merge protocols every global update
                             since the last it holds (catch-up), else its share of the latest adapter
    round(t, updates)        aggregate (``server.round``), then record the result, mark who holds
                             what and fold it into the server's model; a failed round changes nothing
    held_lacking(client, h)  after a server restart: the rounds the client held at the checkpoint
                             and no longer holds
    final_adapter()          the run's whole update against the base model
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from torch import Tensor

from florist.aggregation.base import AggregationResult, Aggregator
from florist.aggregation.protocols import protocol_of
from florist.config import FloristConfig
from florist.errors import ConfigError
from florist.lora import ClientUpdate, LoraFactors
from florist.privacy.client_level import noise_generator, noised_gradient_sum, secret_random
from florist.seeds import derive_seed
from florist.server.checkpoint import ServerState
from florist.server.global_model import GlobalModel, adapted_shapes
from florist.server.round import RoundOutcome, aggregate_round

log = logging.getLogger(__name__)
Modules = dict[str, LoraFactors]


class Joined(Protocol):
    """Anything that names a client, its index and rank (a Flower node's hello, a bench client)."""

    @property
    def client_id(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def rank(self) -> int: ...


@dataclass(frozen=True)
class Member:
    """A client of the federation as the server knows it: its id, 0-based index and LoRA rank."""

    client_id: str
    index: int
    rank: int


class Server:
    """The federation's state (``state``: results sent, what each client holds, metrics lines, the
    skip streak) and the server's global model, with the decisions that read and change them.

    Parameters
    ----------
    cfg : FloristConfig
        The run's configuration (the federation section decides sampling and rounds).
    aggregator : Aggregator
        From ``cfg.aggregator()``; its protocol decides downloads and the model's folding.
    members : Iterable[Member]
        Every client of the federation (any object with ``client_id``, ``index`` and ``rank``).
    model : GlobalModel | None
        The server's copy of the global model; every accepted result is folded into it.
    shapes : Mapping[str, tuple[int, int]] | None
        The adapted modules' ``(m, n)`` (default: read from ``model``): what client-level DP releases
        noise on when no update reaches a round (``min_updates``).
    """

    def __init__(
        self,
        cfg: FloristConfig,
        aggregator: Aggregator,
        members: Iterable[Joined],
        model: GlobalModel | None = None,
        shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.cfg, self.aggregator, self.model = cfg, aggregator, model
        self.rules = protocol_of(aggregator.protocol)
        self.members = sorted((Member(m.client_id, m.index, m.rank) for m in members), key=lambda m: m.index)
        self.ranks = {m.client_id: m.rank for m in self.members}
        self.state = ServerState(round=0, synced={m.client_id: 0 for m in self.members})
        self.last: RoundOutcome | None = None  # the latest round's outcome (its updates, who was dropped)
        self.sampled: dict[int, list[Member]] = {}  # client-level DP's Poisson samples, drawn once a round
        if shapes is None and model is not None:
            shapes = adapted_shapes(model.model, cfg.lora.target_modules)
        self.shapes = dict(shapes) if shapes is not None else None  # the adapted modules' (m, n)

    # ------------------------------------------------------------------ reading the state

    @property
    def history(self) -> list[tuple[int, AggregationResult]]:
        """Every result sent, with its round, oldest first."""
        return self.state.history

    def sent(self) -> list[AggregationResult]:
        return [r for _, r in self.state.history]

    def latest(self) -> AggregationResult:
        """The last result, as it was sent."""
        return self.state.history[-1][1]

    def global_updates(self) -> list[Modules]:
        return [r.global_update for _, r in self.state.history]

    def merged_before(self, round: int) -> list[int]:
        """The rounds a merge-protocol client holds when it trains in ``round``."""
        return [t for t, _ in self.state.history if t < round]

    def final_adapter(self) -> Modules:
        """The run's whole update against the base model, as one adapter (``ClientRules.final``)."""
        if not self.state.history:
            raise ConfigError("no round was aggregated; there is no adapter to write")
        held = self.cfg.held_updates()
        if held is not None and held.capped:  # what quantized clients hold: folded under the cap
            for update in self.global_updates():
                held.fold(update)
            return dict(held.modules)
        return self.rules.final(self.global_updates())

    # ------------------------------------------------------------------ decisions

    def participants(self, round: int) -> list[Member]:
        """Clients of ``round``: the configured schedule, else a seeded sample of ``fraction``; under
        client-level DP with ``fraction`` < 1, each client independently with probability ``fraction``
        from the noise's secret randomness (the Poisson sample the accountant's amplification assumes:
        one anybody could recompute from the config amplifies nothing), drawn once per round and
        possibly empty (``federation.min_clients`` does not apply)."""
        fed = self.cfg.federation
        if fed.participation is not None:
            chosen = set(fed.participation[round - 1])
            return [m for m in self.members if m.index in chosen]
        if self.cfg.privacy.mode == "client" and fed.fraction < 1:
            if round not in self.sampled:
                rng = secret_random(self.cfg.privacy.noise_seed, round)
                self.sampled[round] = [m for m in self.members if rng.random() < fed.fraction]
            return self.sampled[round]
        k = min(len(self.members), max(fed.min_clients, round_half_up(fed.fraction * len(self.members))))
        rng = random.Random(derive_seed(fed.seed, round, "sample"))
        return sorted(rng.sample(self.members, k), key=lambda m: m.index)

    def owed(self, client_id: str) -> dict[int, Modules]:
        """What ``client_id`` downloads before it trains, by round: merge protocols every global update
        after the last it holds, in order; other protocols its share of the latest global adapter."""
        if not self.state.history:
            return {}
        if self.rules.merges:
            since = self.state.synced.get(client_id, 0)
            return {t: r.global_update for t, r in self.state.history if t > since}
        t, result = self.state.history[-1]
        return {t: self.rules.download(result, client_id, self.ranks[client_id])}

    def held_lacking(self, client_id: str, held: Sequence[int]) -> dict[int, Modules]:
        """After a restart: the global updates ``client_id`` held at the checkpoint and lacks now
        (``held``: the rounds it says it holds). Empty for protocols that do not merge."""
        if not self.rules.merges:
            return {}
        since = self.state.synced.get(client_id, 0)
        return {t: r.global_update for t, r in self.state.history if t <= since and t not in held}

    def min_updates(self) -> int:
        """The fewest checked updates a round aggregates (``federation.min_replies``); none under
        client-level DP, whose round releases the noise alone when no update came."""
        if self.cfg.privacy.mode == "client" and self.shapes is not None:
            return 0
        return self.cfg.federation.min_replies

    def round(self, round: int, updates: Sequence[ClientUpdate]) -> RoundOutcome:
        """Aggregate round ``round``'s checked updates (``server.round.aggregate_round``). With a
        result, it is recorded, the clients it aggregated hold every earlier round, the model folds
        it in and the skip streak ends; without one nothing changes but ``last``. An aggregator that
        raises propagates, with nothing changed."""
        outcome = aggregate_round(
            self.cfg, self.aggregator, round, updates, self.sent(), self.ranks, self.shapes
        )
        self.last = outcome
        if outcome.result is not None:
            self.accept(round, outcome.result, outcome.contributors)
        return outcome

    def start_from(
        self, gradients: Sequence[Mapping[str, Tensor]], rank: int, lr: float
    ) -> AggregationResult:
        """Round 0 from the clients' summed gradients (``Aggregator.initial``, Fed-SB); under
        client-level DP the aggregator sees only their clipped, noised sum
        (``florist.privacy.client_level.noised_gradient_sum``). Opens the history (``begin``)."""
        cfg = self.cfg
        if cfg.privacy.mode == "client":
            acc = cfg.accountant()
            assert acc is not None
            noise = noise_generator(cfg.privacy.noise_seed, 0)
            gradients = [noised_gradient_sum(gradients, cfg.privacy.clip, acc.sigma, noise)]
        result = self.aggregator.initial(gradients, rank, lr, cfg.federation.wire_dtype)
        self.begin(result)
        return result

    def begin(self, result: AggregationResult) -> None:
        """Round 0 of a protocol that needs one (``ClientRules.needs_init``): its result, the run's
        starting adapter, opens the history; every client owes it before round 1."""
        if self.state.history:
            raise RuntimeError("round 0 comes before every other round")
        self.accept(0, result)

    def accept(self, round: int, result: AggregationResult, contributors: Sequence[str] = ()) -> None:
        """Record ``result``; the clients behind it (``contributors``, else the result's own ids: under
        client-level DP it aggregated one noised update) hold every round before it."""
        if self.state.history and self.state.history[-1][1].residual is not None:  # only the last is carried
            t, last = self.state.history[-1]
            self.state.history[-1] = (t, replace(last, residual=None))
        self.state.history.append((round, result))
        self.state.skipped_streak = 0
        if self.rules.merges:
            earlier = self.merged_before(round)
            for who in contributors or result.client_ids:
                if who in self.state.synced:
                    self.state.synced[who] = earlier[-1] if earlier else 0
        if self.model is not None:
            self.model.apply_result(round, result)

    def skip(self, round: int, reason: str) -> int:
        """Round ``round`` produced nothing (``reason``); the number of consecutive skipped rounds."""
        self.state.skipped_streak += 1
        log.warning("round %d skipped, global model unchanged: %s", round, reason)
        return self.state.skipped_streak

    # ------------------------------------------------------------------ checkpoints

    def restore(self, state: ServerState) -> None:
        """Continue from a checkpoint's ``state``: the results sent fold into the model again. Clients
        the checkpoint does not name (the federation changed size) start as holding nothing."""
        synced = {m.client_id: state.synced.get(m.client_id, 0) for m in self.members}
        self.state = ServerState(state.round, list(state.history), synced, list(state.records),
                                 state.skipped_streak)  # fmt: skip
        if self.model is not None:
            for t, result in self.state.history:
                self.model.apply_result(t, result)


def round_half_up(x: float) -> int:
    return int(x + 0.5)
