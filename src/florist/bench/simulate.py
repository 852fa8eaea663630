"""An in-process federation for comparisons: the same clients, aggregators and evaluation as
``florist run``, without the transport, so round 1 can be trained once and shared by every method.

Round 1 starts every client from the base model with a fresh LoRA whose A is drawn by the init
policy (``florist.client.local``), so its uploads are the same for every method whose clients train
both A and B from the same draw: all merge-protocol methods under one ``lora.init``, and the
continue-protocol methods with them when ``lora.init = "shared"`` (``compare.round_one_key``).
After round 1, merge-protocol clients restart their LoRA and continue-protocol clients overwrite it
with their download, so nothing else of round 1's local state carries over: reusing the uploads is
exact, not an approximation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from florist.aggregation import communication, efficiency, make_aggregator
from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.client.local import LocalClient
from florist.client.model import load_model
from florist.config import RunConfig
from florist.data.federated import client_examples
from florist.flower.global_model import GlobalModel
from florist.flower.node import client_id
from florist.lora import ClientUpdate

log = logging.getLogger(__name__)
Evaluate = Callable[[Any, Any], dict[str, float]]


def make_clients(cfg: RunConfig, protocol: ClientProtocol) -> list[LocalClient]:
    n = cfg.federation.num_clients
    shared_rank = max(cfg.lora.rank_of(k, n) for k in range(n))
    clients = []
    for k in range(n):
        model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        settings = cfg.lora.settings(k, n)
        examples = client_examples(cfg.data, k, n)
        model = model.to(cfg.model.torch_device())
        seed = cfg.federation.seed
        clients.append(
            LocalClient(client_id(k), model, tok, examples, settings, cfg.train, protocol, seed, shared_rank)
        )
    return clients


def train_round(clients: Sequence[LocalClient], round: int) -> tuple[list[ClientUpdate], dict[str, float]]:
    updates, seconds, loss = [], 0.0, 0.0
    for c in clients:
        update, stats = c.fit(round)
        updates.append(update)
        seconds += stats.seconds
        loss += stats.loss * c.num_examples
    return updates, {"train_loss": loss / sum(c.num_examples for c in clients), "train_seconds": seconds}


def relative_error(result: AggregationResult, updates: Sequence[ClientUpdate]) -> float:
    """``||dW_g - sum_k p_k dW_k||_F / ||sum_k p_k dW_k||_F`` over all modules (dense, per module)."""
    num = den = 0.0
    for name, g in result.global_update.items():
        exact = sum(result.weights[u.client_id] * u.modules[name].delta(torch.float64) for u in updates)
        assert isinstance(exact, torch.Tensor)
        num += float((g.delta(torch.float64) - exact).square().sum())
        den += float(exact.square().sum())
    return (num / den) ** 0.5 if den else 0.0


def round_record(round: int, result: AggregationResult, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
    comm = communication(updates, result)
    return {
        "round": round,
        "bytes_up": comm.uplink_total,
        "bytes_down": comm.downlink_total,
        "efficiency_e-4": efficiency(result),
        "aggregation_seconds": result.seconds,
        "ranks": result.ranks,
        "rank_total": sum(result.ranks.values()),
        "rel_error_vs_exact": relative_error(result, updates),
    }


def run_variant(
    cfg: RunConfig,
    evaluate: Evaluate,
    round_one: list[ClientUpdate] | None = None,
    on_result: Callable[[int, AggregationResult], None] | None = None,
) -> list[dict[str, Any]]:
    """All rounds of one method; ``round_one`` (if given) replaces round 1's local training."""
    agg = make_aggregator(cfg.aggregation.method, **cfg.aggregation.options().aggregator_options())
    clients = make_clients(cfg, agg.protocol)
    model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
    server = GlobalModel(model.to(cfg.model.torch_device()), tok, agg.protocol)
    records = []
    for t in range(1, cfg.federation.rounds + 1):
        start = time.perf_counter()
        if t == 1 and round_one is not None:
            updates, train = round_one, {"train_loss": float("nan"), "train_seconds": 0.0, "shared": 1.0}
        else:
            updates, train = train_round(clients, t)
        result = agg.aggregate(updates, round=t)
        for c in clients:
            c.receive(result.download(c.client_id) if result.per_client else result.global_update, round=t)
        server.apply_result(t, result)
        if on_result is not None:
            on_result(t, result)
        record = round_record(t, result, updates) | train | {"eval": evaluate(server.model, server.tokenizer)}
        record["round_seconds"] = time.perf_counter() - start
        log.info(
            "%s round %d: %s", cfg.aggregation.method, t, {k: record[k] for k in ("rank_total", "bytes_down")}
        )
        records.append(record)
    return records


def shared_round_one(cfg: RunConfig) -> list[ClientUpdate]:
    """Round 1's uploads from the base model (valid for every variant except FFA-LoRA)."""
    clients = make_clients(cfg, ClientProtocol.MERGE_AND_RESTART)
    updates, _ = train_round(clients, 1)
    return updates
