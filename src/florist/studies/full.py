"""FedAvg on full weights: the reference a user with bandwidth to spare would weigh (``florist bench``).

Every client fine-tunes the full weights of the adapted modules (the config's ``lora.target_modules``,
q_proj and v_proj in the paper's setting; the rest of the model stays frozen, as under LoRA) and
uploads its change; the server averages the changes and every client downloads the new weights:

    W_t = W_{t-1} + sum_k p_k (W_k,t - W_{t-1})        dense (m, n) per module, both directions

Same clients, data stream, seeds, steps and batch as the LoRA variants; the learning rate is the LoRA
one times ``LR_FACTOR`` (full fine-tuning takes AdamW steps about ten times smaller than LoRA; not
tuned here). Bytes are counted as sent: ``m n`` elements of the wire dtype per module, each way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from florist.client.local import client_id
from florist.client.model import load_model
from florist.client.train import TrainSettings, TrainStats, encode_all, train
from florist.config import FloristConfig
from florist.data.federated import client_examples
from florist.data.records import Example
from florist.dtypes import itemsize
from florist.seeds import derive_seed
from florist.server.global_model import adapted_shapes

log = logging.getLogger(__name__)
METHOD = "fedavg-full"
LABEL = "FedAvg (full weights)"
LR_FACTOR = 0.1
Weights = dict[str, torch.Tensor]


class FullClient:
    """One client that trains the full weights of the adapted modules (everything else frozen)."""

    def __init__(
        self, client_id: str, model: Any, tokenizer: Any, examples: Sequence[Example],
        targets: Sequence[str], training: TrainSettings, seed: int,
    ) -> None:  # fmt: skip
        self.client_id, self.model, self.training, self.seed = client_id, model, training, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoded = encode_all(examples, tokenizer, training)
        self.num_examples = len(self.encoded)
        self.names = sorted(adapted_shapes(model, targets))
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self.names:
            model.get_submodule(name).weight.requires_grad_(True)

    def weights(self) -> Weights:
        return {n: self.model.get_submodule(n).weight.detach().clone() for n in self.names}

    @torch.no_grad()
    def load(self, weights: Weights) -> None:
        for name, w in weights.items():
            self.model.get_submodule(name).weight.copy_(w)

    def fit(self, round: int) -> tuple[Weights, TrainStats]:
        """Train one round from the current weights; the change of each adapted weight, ``(m, n)``."""
        before = self.weights()
        per_round = self.training.examples_per_round(len(self.encoded))
        seed = derive_seed(self.seed, self.client_id, round, "train")  # as LocalClient.fit draws them
        data_seed = derive_seed(self.seed, self.client_id, "data")
        stats = train(
            self.model, self.encoded, self.training, seed=seed, pad_id=self.pad_id,
            desc=f"{self.client_id} round {round}", data_seed=data_seed, start=max(0, round - 1) * per_round,
        )  # fmt: skip
        after = self.weights()
        return {n: after[n] - before[n] for n in self.names}, stats


def make_full_clients(cfg: FloristConfig) -> list[FullClient]:
    n = cfg.federation.num_clients
    training = replace(cfg.train, lr=cfg.train.lr * LR_FACTOR)
    clients = []
    for k in range(n):
        model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        clients.append(
            FullClient(
                client_id(k),
                model.to(cfg.model.torch_device()),
                tok,
                client_examples(cfg.data, k, n),
                cfg.lora.target_modules,
                training,
                cfg.federation.seed,
            )
        )
    return clients


def average(deltas: Sequence[Weights], weights: Sequence[float]) -> Weights:
    """``sum_k p_k delta_k`` per module, accumulated in float64."""
    total = sum(weights)
    return {
        name: sum((p / total) * d[name].double() for d, p in zip(deltas, weights, strict=True)).float()  # type: ignore[union-attr]
        for name in deltas[0]
    }


def run_full_variant(
    cfg: FloristConfig,
    evaluate: Callable[[Any, Any], dict[str, Any]],
    eval_rounds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """All rounds of FedAvg on full weights; records shaped like ``simulate.run_variant``'s."""
    clients = make_full_clients(cfg)
    server_model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
    server_model.to(cfg.model.torch_device())
    server = FullClient("server", server_model, tok, [], cfg.lora.target_modules, cfg.train, 0)
    due = set(range(1, cfg.federation.rounds + 1) if eval_rounds is None else eval_rounds)
    records = []
    for t in range(1, cfg.federation.rounds + 1):
        records.append(full_round(t, clients, server, cfg.federation.wire_dtype))
        if t in due:
            records[-1]["eval"] = evaluate(server.model, tok)
        log.info("%s round %d: %s", METHOD, t, {k: records[-1][k] for k in ("bytes_up", "bytes_down")})
    return records


def full_round(t: int, clients: Sequence[FullClient], server: FullClient, wire: str) -> dict[str, Any]:
    """Train every client, average the changes into the server's weights, send them back."""
    start = time.perf_counter()
    start_w = server.weights()
    results = [c.fit(t) for c in clients]
    sizes = [float(c.num_examples) for c in clients]
    server.load({n: start_w[n] + d for n, d in average([d for d, _ in results], sizes).items()})
    new = server.weights()
    per_client = sum(w.numel() for w in new.values()) * itemsize(wire)  # (m, n) per module, each way
    error = fedavg_error(new, start_w, [d for d, _ in results], sizes)
    for c in clients:
        c.load(new)
    loss = sum(s.loss * n for (_, s), n in zip(results, sizes, strict=True)) / sum(sizes)
    return {
        "round": t, "bytes_up": per_client * len(clients), "bytes_down": per_client * len(clients),
        "rank_total": None, "round_error": error, "train_loss": loss,
        "train_seconds": sum(s.seconds for _, s in results), "round_seconds": time.perf_counter() - start,
    }  # fmt: skip


def fedavg_error(new: Weights, start: Weights, deltas: Sequence[Weights], sizes: Sequence[float]) -> float:
    """``|| W_t - sum_k p_k W_k,t || / || sum_k p_k W_k,t - W_{t-1} ||`` (simulate.round_error's
    definition), from the weights as the server holds them: float32 rounding only."""
    num = den = 0.0
    total = sum(sizes)
    for name, w in new.items():
        exact = start[name].double() + sum(
            (n / total) * d[name].double() for d, n in zip(deltas, sizes, strict=True)
        )
        num += float((w.double() - exact).square().sum())
        den += float((exact - start[name].double()).square().sum())
    return (num / den) ** 0.5 if den else 0.0
