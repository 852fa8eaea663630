"""What one SuperNode keeps between messages: its client (model, data, LoRA) and the merges it holds.

A node is cached in the process that runs its ClientApp (a Ray actor in simulation), so the model
is loaded once per node and not every round. Every global update a node receives is also kept in
its Flower ``Context.state``; a node whose process was restarted (the deployment runtime starts a
ClientApp process per message) rebuilds the same weights by replaying them in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, RecordDict

from florist.aggregation.base import ClientProtocol
from florist.client.local import LocalClient, client_from_config
from florist.client.model import load_client_model
from florist.config import FloristConfig
from florist.data.federated import client_examples, subsample
from florist.data.loaders import load_examples
from florist.data.records import Example
from florist.errors import ConfigError
from florist.flower.codec import basis_of, decode_cores, decode_factors

log = logging.getLogger(__name__)
GLOBAL_PREFIX = "global."
BASIS_KEY = "basis"  # a core protocol's basis, kept in the node's state for a restarted process


def partition_id(context: Context, num_clients: int) -> int:
    """The node's client index from its node config (``partition-id``, as Flower's simulation sets)."""
    raw = context.node_config.get("partition-id")
    if raw is None:
        raise ConfigError("the SuperNode has no 'partition-id' in its node config (--node-config)")
    index = int(raw)
    if not 0 <= index < num_clients:
        raise ConfigError(f"node partition-id {index} is outside [0, {num_clients}) (federation.num_clients)")
    return index


def node_examples(cfg: FloristConfig, context: Context) -> list[Example]:
    """This node's training examples: its own file when its node config names one, else its share.

    A site that keeps its data at home starts its SuperNode with
    ``--node-config "partition-id=K data-path=/site/train.json"``; ``data.format`` and
    ``data.max_examples_per_client`` apply as for a shared source, and nothing else leaves the site.
    """
    n = cfg.federation.num_clients
    k = partition_id(context, n)
    path = context.node_config.get("data-path")
    if path is None:
        return client_examples(cfg.data, k, n)
    if not Path(str(path)).exists():
        raise ConfigError(f"node {k}: data-path {str(path)!r} (its --node-config) does not exist")
    return subsample(load_examples(str(path), fmt=cfg.data.format, label=cfg.data.label), cfg.data, k)


def protocol_of(cfg: FloristConfig) -> ClientProtocol:
    return cfg.aggregator().protocol


def configure_threads(cfg: FloristConfig) -> None:
    """Torch threads: FLORIST_THREADS, else the client's CPU share (Ray may have set 1)."""
    threads = int(os.environ.get("FLORIST_THREADS", 0)) or max(1, int(cfg.federation.cpus_per_client))
    torch.set_num_threads(threads)


@dataclass
class Node:
    """A node's client and the rounds whose global update is merged into its base weights."""

    index: int
    client: LocalClient
    merged: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: FloristConfig, index: int, examples: list[Example]) -> Node:
        configure_threads(cfg)
        model, tokenizer = load_client_model(cfg)
        client = client_from_config(cfg, index, model, tokenizer, examples, protocol_of(cfg))
        log.info(
            "%s: model loaded, %d examples, rank %d", client.client_id, client.num_examples, client.lora.rank
        )
        return cls(index, client)

    def receive(self, downloads: Mapping[int, ArrayRecord], state: Context) -> None:
        """Apply global updates: all unmerged ones in round order (merge protocols), else the latest."""
        if self.client.rules.merges:
            for key, record in downloads.items():
                state.state[f"{GLOBAL_PREFIX}{key}"] = record
            for rnd, record in stored_globals(state).items():
                if rnd not in self.merged:
                    self.client.receive(decode_factors(record, "server"), round=rnd)
                    self.merged.append(rnd)
        elif downloads and self.client.rules.needs_init:  # a core; the basis when it comes with it
            rnd = max(downloads)
            if basis_of(downloads[rnd]):
                state.state[BASIS_KEY] = downloads[rnd]
            held = state.state.get(BASIS_KEY)
            basis = basis_of(held) if isinstance(held, ArrayRecord) else None
            self.client.receive(decode_cores(downloads[rnd], "server", basis=basis), round=rnd)
        elif downloads:
            rnd = max(downloads)
            b_only = not self.client.rules.sends_a
            self.client.receive(decode_factors(downloads[rnd], "server", b_only=b_only), round=rnd)

    def digest(self) -> str:
        """sha256 of what the merges changed (equal on every node after the same merges): the adapted
        base weights, or on a quantized base the held global adapter (``florist.client.merged``)."""
        return self.client.base.digest()


def stored_globals(context: Context) -> dict[int, ArrayRecord]:
    """Global updates kept in the node's state, by round."""
    return globals_by_round(context.state)


def globals_by_round(content: RecordDict) -> dict[int, ArrayRecord]:
    """The ``global.{round}`` array records of a message or a node state, by round."""
    found = {}
    for key, record in content.array_records.items():
        if key.startswith(GLOBAL_PREFIX):
            found[int(key.removeprefix(GLOBAL_PREFIX))] = record
    return dict(sorted(found.items()))


_NODES: dict[tuple[int, int], Node] = {}


def get_node(cfg: FloristConfig, context: Context) -> Node:
    """The cached node for this run and node id, created (model loaded) on first use."""
    key = (context.run_id, context.node_id)
    node = _NODES.get(key)
    if node is None:
        for old in [k for k in _NODES if k[0] != context.run_id]:
            del _NODES[old]  # a new run: free the previous run's models
        index = partition_id(context, cfg.federation.num_clients)
        node = _NODES[key] = Node.create(cfg, index, node_examples(cfg, context))
    return node
