"""One server round, the same for every runtime: the Flower strategy and the in-process bench call it.

    uploads -> deltas (warm start: less the warm part; FedEx-LoRA: the start attached) -> clip
            -> aggregate -> finite? -> wire dtype

A result that is not finite (or an aggregator that fails) leaves out the client with the largest
update norm and aggregates again, never going below ``federation.min_replies``; the caller gets the
left-out clients with their reasons. No transport here: updates arrive decoded and checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from florist.aggregation.base import AggregationResult, Aggregator
from florist.aggregation.lowrank import result_to_wire, to_wire
from florist.aggregation.protocols import ClientRules, protocol_of
from florist.aggregation.robust import ClipReport, cap_weights, clip_factors, clip_updates, update_norm
from florist.config import FloristConfig
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.seeded import seeded_a
from florist.privacy.client_level import NOISED, noise_generator, noised_mean, noised_mean_factor
from florist.seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What a round produced: the result as sent (None when no subset aggregates to finite values),
    the updates it aggregated (after warm correction and clipping), who was left out and why."""

    result: AggregationResult | None
    updates: list[ClientUpdate]
    dropped: dict[str, str] = field(default_factory=dict)
    clip: ClipReport | None = None
    contributors: tuple[str, ...] = ()  # the clients whose uploads are in the result (under
    # client-level DP the result aggregates one noised update; these are the clients behind it)


def aggregate_round(
    cfg: FloristConfig,
    aggregator: Aggregator,
    round: int,
    uploads: Sequence[ClientUpdate],
    history: Sequence[AggregationResult],
    ranks: Mapping[str, int],
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> RoundOutcome:
    """Round ``round`` from the clients' ``uploads``; ``history`` holds every result sent so far,
    oldest first (empty in round 1).

    ``ranks`` maps client id to its LoRA rank (the warm part a warm-started client began from, and
    what a per-client download must fit: ``ClientUpdate.lora_rank``). ``shapes``, the adapted
    modules' ``(m, n)``, let client-level DP release noise alone when no update came.
    """
    if history and history[-1].residual is not None and getattr(aggregator, "feedback", False):
        aggregator = replace(aggregator, carry=history[-1].residual)  # type: ignore[type-var]
        # error feedback: the last cut's tail joins in (a resume forced to turn it off drops it)
    uploads = [replace(u, lora_rank=ranks.get(u.client_id)) for u in uploads]
    if cfg.federation.max_client_weight is not None and uploads:
        uploads = cap_weights(uploads, cfg.federation.max_client_weight)
    deltas = round_deltas(cfg, uploads, history, ranks)
    if cfg.privacy.mode == "client":
        return private_round(cfg, aggregator, round, deltas, history, shapes)
    clipped, report = clip(cfg, deltas, round)
    averages_factors = not type(aggregator).products_only
    if report is not None and averages_factors:
        clipped = clip_factors(clipped, cfg.aggregation.clip_value, with_a=type(aggregator).uploads_a())
    fed = cfg.federation
    outcome = aggregate_finite(aggregator, round, clipped, fed.min_replies, fed.wire_dtype)
    outcome.clip = report
    return outcome


def private_round(
    cfg: FloristConfig,
    aggregator: Aggregator,
    round: int,
    deltas: Sequence[ClientUpdate],
    history: Sequence[AggregationResult],
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> RoundOutcome:
    """Client-level DP (``florist.privacy.client_level``): the aggregator sees only the noised mean of
    the clipped changes, one update carrying its noise level; no client is left out after the noise
    (the mechanism's output is released as it is, or, when the aggregate is not finite, the round is
    skipped). A round no update reached (an empty Poisson sample, or every sampled client silent)
    releases the noise alone, as the mechanism the accountant analyses does: skipping it would tell
    that the sample was empty. That needs the modules' ``shapes``; without them (no server model)
    the round is skipped."""
    if not deltas and shapes is None:
        return RoundOutcome(None, [])
    acc = cfg.accountant()
    assert acc is not None
    noise, denominator = noise_generator(cfg.privacy.noise_seed, round), cfg.dp_denominator(round)
    if type(aggregator).products_only:
        noised, std = noised_mean(deltas, cfg.privacy.clip, acc.sigma, noise, denominator, shapes)
    else:  # the factors a method averages (B; FedIT: B and A), from the global the round began at
        rules = protocol_of(aggregator.protocol)
        with_a = type(aggregator).uploads_a()
        start = rules.round_start(history)
        if start is None and not rules.needs_init:  # round 1 began at the shared draw (its A released)
            start = shared_draw(cfg, drawn_shapes(cfg, deltas, shapes), rules)
        noised, std = noised_mean_factor(
            deltas, start, cfg.privacy.clip, acc.sigma, noise, with_a, denominator
        )
    noised = replace(noised, noise_std=std)
    result, why = attempt(aggregator, round, [noised], cfg.federation.wire_dtype)
    behind = tuple(sorted(d.client_id for d in deltas)) if result is not None else ()
    return RoundOutcome(
        result, [noised], {} if result is not None else {NOISED: f"round {round}: {why}"}, contributors=behind
    )


def shared_draw(
    cfg: FloristConfig, shapes: Mapping[str, tuple[int, int, int]], rules: ClientRules
) -> dict[str, LoraFactors]:
    """Where a continue-protocol client began round 1: B = 0 and the A it trained against, every
    client's rank its leading rows. FedIT (A uploaded): the round's shared draw
    (``LocalClient.fresh_lora``), rebuilt from the run's seed and rounded to the wire dtype as the
    uploads are (so an unchanged entry is no change). FFA-LoRA, FedSVD (A never sent): the frozen
    draw the server knows (``ClientRules.upload_a``), exactly as the clients hold it. ``shapes``:
    ``(m, r, n)`` per module (``drawn_shapes``)."""
    seed, rows = cfg.federation.seed, cfg.lora.shared_rank(cfg.federation.num_clients)
    start = {}
    for name, (m, r, n) in shapes.items():
        if not rules.uploads_a:
            start[name] = LoraFactors(A=rules.upload_a([], seed, rows, name, n)[:r], B=torch.zeros(m, r))
            continue
        drawn = LoraFactors(
            A=seeded_a(derive_seed(seed, "shared-init", 0), name, rows, n)[:r], B=torch.zeros(m, r)
        )
        start[name] = to_wire(drawn, cfg.federation.wire_dtype)
    return start


def drawn_shapes(
    cfg: FloristConfig, updates: Sequence[ClientUpdate], shapes: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, tuple[int, int, int]]:
    """``(m, r, n)`` per module of round 1's shared draw: the first update's, else (no update came) the
    modules' ``shapes`` at the largest rank."""
    if updates:
        return {name: (f.B.shape[0], f.A.shape[0], f.A.shape[1]) for name, f in updates[0].modules.items()}
    assert shapes is not None
    return {name: (m, cfg.lora.shared_rank(cfg.federation.num_clients), n) for name, (m, n) in shapes.items()}


def round_deltas(
    cfg: FloristConfig,
    uploads: Sequence[ClientUpdate],
    history: Sequence[AggregationResult],
    ranks: Mapping[str, int],
) -> list[ClientUpdate]:
    """What the clients changed this round (``florist.aggregation.protocols``: with warm start, each
    upload less its warm part; a merge-and-continue client's upload with the slice it continued from)."""
    if not history:
        return list(uploads)
    warm_from = cfg.lora.warm_from if cfg.lora.warm_start and not sends_change(cfg) else None
    return protocol_of(history[-1].protocol).deltas(uploads, history, ranks, warm_from)


def sends_change(cfg: FloristConfig) -> bool:
    """Whether warm-started clients upload their round's change rather than their whole adapter."""
    fed = cfg.federation
    return cfg.lora.warm_start and fed.uplink_tau is not None and fed.uplink_cut == "change"


def clip(
    cfg: FloristConfig, updates: list[ClientUpdate], round: int
) -> tuple[list[ClientUpdate], ClipReport | None]:
    """Robust mode (``aggregation.clip``): norms clipped to the threshold; unchanged when off."""
    agg = cfg.aggregation
    if agg.clip == "none":
        return updates, None
    clipped, report = clip_updates(updates, agg.clip, agg.clip_value)
    if report.clipped:
        log.info("round %d: clipped %s to norm %.4g", round, ", ".join(report.clipped), report.threshold)
    return clipped, report


def attempt(
    aggregator: Aggregator, round: int, updates: list[ClientUpdate], wire: str
) -> tuple[AggregationResult | None, str]:
    """The result as it will be sent (rounded to the wire dtype) if finite, else None and why."""
    try:
        result = result_to_wire(aggregator.aggregate(updates, round=round), wire)
    except Exception as err:  # e.g. an SVD that does not converge on extreme values
        return None, f"aggregation failed ({type(err).__name__}: {err})"
    if result.is_finite():
        return result, ""
    return None, "the aggregate is not finite (as rounded to the wire dtype)"


def culprit(
    aggregator: Aggregator, round: int, updates: list[ClientUpdate], wire: str
) -> tuple[ClientUpdate, str]:
    """The client whose absence makes the round aggregate: each left out in turn (id order); when no
    single one does, the one of largest update norm. With why it was chosen."""
    for u in updates:
        rest = [v for v in updates if v.client_id != u.client_id]
        if attempt(aggregator, round, rest, wire)[0] is not None:
            return u, "without it the round aggregates"
    worst = max(updates, key=lambda u: (update_norm(u), u.client_id))
    return worst, "no single client's absence fixes it; it has the largest update norm"


def aggregate_finite(
    aggregator: Aggregator, round: int, updates: list[ClientUpdate], min_replies: int, wire: str = "float32"
) -> RoundOutcome:
    """Aggregate and round to the wire dtype; while that is not finite or the aggregator fails, leave
    out the culprit (``culprit``: found by leaving each client out in turn) and try again, never going
    below ``min_replies`` updates. Finiteness is checked on exactly what is sent and merged."""
    dropped: dict[str, str] = {}
    while len(updates) >= min_replies:
        result, why = attempt(aggregator, round, updates, wire)
        if result is not None:
            return RoundOutcome(result, updates, dropped, contributors=result.client_ids)
        if len(updates) == 1:
            break
        worst, how = culprit(aggregator, round, updates, wire)
        dropped[worst.client_id] = f"round {round}: {why}; {how}: left out"
        updates = [u for u in updates if u.client_id != worst.client_id]
    return RoundOutcome(None, updates, dropped)
