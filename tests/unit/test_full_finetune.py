"""FedAvg on full weights (the bench's ``fedavg-full`` reference): only the adapted weights train,
the server's new weights are the weighted mean of the clients' trained weights, bytes are dense."""

from __future__ import annotations

import torch

from florist.client.train import TrainSettings
from florist.data.records import Example
from florist.studies.full import FullClient, full_round
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer

DATA = [
    [Example(f"Add {a} and {b}.", str(a + b), category="add") for a in range(3) for b in range(3)],
    [Example(f"Shout {w}.", w.upper(), category="shout") for w in ("cat", "dog", "sun", "sky", "red")],
]
TRAIN = TrainSettings(lr=1e-3, steps=2, batch_size=2, max_length=256)
TARGETS = ("q_proj", "v_proj")


def _client(cid: str, data: list[Example]) -> FullClient:
    return FullClient(cid, tiny_llama(vocab_size=VOCAB_SIZE), tiny_tokenizer(), data, TARGETS, TRAIN, seed=0)


def test_only_the_adapted_weights_train() -> None:
    c = _client("c0", DATA[0])
    before = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    deltas, stats = c.fit(1)
    assert stats.steps == 2 and sorted(deltas) == c.names and all(n.endswith(TARGETS) for n in c.names)
    for name, p in c.model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == name.removesuffix(".weight").endswith(TARGETS), name
    for name, d in deltas.items():
        torch.testing.assert_close(d, c.model.get_submodule(name).weight.detach() - before[f"{name}.weight"])


def test_the_server_holds_the_weighted_mean_of_the_clients_models_and_sends_them_back() -> None:
    clients = [_client("c0", DATA[0]), _client("c1", DATA[1])]
    server = FullClient("server", tiny_llama(vocab_size=VOCAB_SIZE), tiny_tokenizer(), [], TARGETS, TRAIN, 0)
    start = server.weights()
    record = full_round(1, clients, server, "float32")
    trained = [c.weights() for c in clients]  # after the round every client holds the server's weights
    assert all(torch.equal(t[n], server.weights()[n]) for t in trained for n in start)
    per_client = sum(w.numel() for w in start.values()) * 4
    assert record["bytes_up"] == record["bytes_down"] == 2 * per_client
    assert record["round_error"] < 1e-6
    again = [_client("c0", DATA[0]), _client("c1", DATA[1])]  # the same seeds: the same trained models
    models = [{n: start[n] + d[n] for n in start} for d, _ in (c.fit(1) for c in again)]
    p = [c.num_examples / (clients[0].num_examples + clients[1].num_examples) for c in clients]
    for name in start:
        torch.testing.assert_close(server.weights()[name], p[0] * models[0][name] + p[1] * models[1][name])
