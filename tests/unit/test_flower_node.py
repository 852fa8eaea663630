"""A node's catch-up: global updates merged late, or replayed after a restart, give the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from florist.client.lora_state import lora_layers
from florist.client.model import load_model
from florist.flower import node as node_mod
from florist.flower.codec import encode_factors
from florist.flower.node import get_node
from florist.flower.replies import ClientInfo
from florist.lora import LoraFactors
from florist.server.global_model import GlobalModel
from tests.flower_helpers import save_tiny_model, tiny_run_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def context(node_id: int, index: int) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config={"partition-id": index}, state=RecordDict(), run_config={}
    )


def global_updates(names: list[str], shapes: dict[str, tuple[int, int]]) -> dict[int, dict[str, LoraFactors]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for t, rank in ((1, 3), (2, 5)):
        out[t] = {
            n: LoraFactors(
                A=torch.randn(rank, shapes[n][1], generator=g),
                B=0.01 * torch.randn(shapes[n][0], rank, generator=g),
            )
            for n in names
        }
    return out


def test_late_and_replayed_merges_give_bitwise_equal_weights(model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(model_dir, tmp_path, "node")
    node_mod._NODES.clear()
    ctx_a, ctx_b = context(11, 0), context(12, 0)
    a = get_node(cfg, ctx_a)
    names = sorted(n for n, _ in lora_layers(a.client.model))
    shapes = {n: tuple(layer.get_base_layer().weight.shape) for n, layer in lora_layers(a.client.model)}
    ups = global_updates(names, shapes)
    a.receive({1: encode_factors(ups[1])}, ctx_a)  # every round, as it happens
    a.receive({2: encode_factors(ups[2])}, ctx_a)
    b = get_node(cfg, ctx_b)
    b.receive({1: encode_factors(ups[1]), 2: encode_factors(ups[2])}, ctx_b)  # skipped round 2: both at once
    assert a.merged == b.merged == [1, 2]
    assert a.digest() == b.digest()

    node_mod._NODES.clear()  # the ClientApp process restarted: the node replays its stored updates
    c = get_node(cfg, ctx_b)
    assert c.merged == []
    c.receive({}, ctx_b)
    assert c.merged == [1, 2] and c.digest() == a.digest()

    model, tok = load_model(str(model_dir))
    server = GlobalModel(model, tok, a.client.protocol)
    base = {n: server.weight(n).detach().clone() for n in names}
    server.apply(1, ups[1])
    server.apply(2, ups[2])
    assert server.digest(names) == a.digest()  # the server's global model is the clients' model
    for n in names:
        want = base[n].double() + ups[1][n].delta(torch.float64) + ups[2][n].delta(torch.float64)
        torch.testing.assert_close(server.weight(n).double(), want, rtol=1e-5, atol=1e-6)


def test_a_client_continues_from_its_rank_of_the_global_adapter() -> None:
    from florist.aggregation import make_aggregator
    from tests.helpers import make_updates

    updates = make_updates([8, 4])
    result = make_aggregator("fedit").aggregate(updates)
    info = ClientInfo(node_id=1, client_id=updates[1].client_id, index=1, rank=4, num_examples=1)
    got = result.continue_from(info.client_id, info.rank)
    want = result.download(updates[1].client_id)
    for name in want:
        torch.testing.assert_close(got[name].delta(), want[name].delta())
    late = ClientInfo(node_id=2, client_id="late", index=2, rank=2, num_examples=1)  # not in this round
    for name, f in result.continue_from(late.client_id, late.rank).items():
        assert f.rank == 2
        torch.testing.assert_close(f.B, result.global_update[name].effective()[0][:, :2])


def test_sampling_is_seeded_and_respects_fraction_and_minimum(tmp_path: Path) -> None:
    from florist.aggregation import make_aggregator
    from florist.config import load_config
    from florist.flower.strategy import FederatedLoRA

    clients = [
        ClientInfo(node_id=100 + k, client_id=f"client-{k:03d}", index=k, rank=4, num_examples=10)
        for k in range(8)
    ]

    def picks(*overrides: str) -> list[list[int]]:
        cfg = load_config(
            None, ["federation.num_clients=8", "lora.ranks=[4]", "federation.rounds=4", *overrides]
        )
        strategy = FederatedLoRA(cfg, make_aggregator("florist"), clients, {})
        return [[c.index for c in strategy.participants(t)] for t in range(1, 5)]

    half = picks("federation.fraction=0.5")
    assert all(len(p) == 4 and p == sorted(p) for p in half)
    assert half == picks("federation.fraction=0.5")  # seeded
    assert len({tuple(p) for p in half}) > 1  # a different sample per round
    assert picks("federation.fraction=0.5", "federation.seed=1") != half
    assert all(len(p) == 3 for p in picks("federation.fraction=0.1", "federation.min_clients=3"))
    assert picks("federation.participation=[[0], [1, 2], [7], [0, 7]]") == [[0], [1, 2], [7], [0, 7]]


def test_a_site_trains_on_its_own_file_from_its_node_config(model_dir: Path, tmp_path: Path) -> None:
    import json

    from florist.errors import ConfigError
    from florist.flower.node import node_examples

    rows = [
        {"instruction": f"Say {w}.", "context": "", "response": w, "category": "open_qa"}
        for w in ("alpha", "beta", "gamma")
    ]
    site = tmp_path / "site-1.json"
    site.write_text(json.dumps(rows))
    cfg = tiny_run_config(model_dir, tmp_path, "site")
    ctx = Context(
        run_id=2, node_id=21, node_config={"partition-id": 1, "data-path": str(site)}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    examples = node_examples(cfg, ctx)
    assert [ex.response for ex in examples] == ["alpha", "beta", "gamma"]
    assert node_examples(cfg, context(22, 1)) != examples  # without data-path: its share of data.source
    node_mod._NODES.clear()
    assert get_node(cfg, ctx).client.num_examples == 3
    capped = tiny_run_config(model_dir, tmp_path, "site2", "data.max_examples_per_client=2")
    assert len(node_examples(capped, ctx)) == 2
    ctx.node_config["data-path"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="node 1: data-path .*missing.json.* does not exist"):
        node_examples(cfg, ctx)
