"""Merge protocols on a quantized base: the global updates held beside the frozen base as one adapter
(``florist.aggregation.held``, ``florist.client.merged``), checked on products against dense float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from florist.aggregation.base import ClientProtocol
from florist.aggregation.held import HeldUpdates
from florist.client.local import client_from_config
from florist.client.lora_state import lora_layers
from florist.client.merged import BesideBase
from florist.client.model import load_client_model, load_model
from florist.config import load_config
from florist.data.federated import client_examples
from florist.errors import ConfigError
from florist.lora import LoraFactors
from florist.server.global_model import GlobalModel, adapted_shapes
from tests.flower_helpers import save_tiny_model
from tests.tiny_tokenizer import VOCAB_SIZE

SHAPES = {"a": (12, 9), "b": (7, 10)}


def update(seed: int, rank: int = 3, scaling: float = 0.5) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {name: LoraFactors(A=torch.randn(rank, n, generator=g), B=torch.randn(m, rank, generator=g),
                              scaling=scaling) for name, (m, n) in SHAPES.items()}  # fmt: skip


def best_rank(dense: torch.Tensor, p: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return (U[:, :p] * S[:p]) @ Vh[:p]


def test_an_uncapped_fold_holds_the_exact_sum_of_the_updates() -> None:
    held, dense = (
        HeldUpdates(),
        {name: torch.zeros(m, n, dtype=torch.float64) for name, (m, n) in SHAPES.items()},
    )
    for t in range(4):
        u = update(t)
        held.fold(u)
        for name in SHAPES:
            dense[name] += u[name].delta(torch.float64)
            torch.testing.assert_close(
                held.modules[name].delta(torch.float64), dense[name], rtol=1e-5, atol=1e-5
            )
    assert held.ranks() == {"a": 12, "b": 12}  # 4 rounds of rank 3


@pytest.mark.parametrize(("max_rank", "tau"), [(4, 1.0), (None, 0.8), (5, 0.95)])
def test_a_capped_fold_is_the_best_approximation_of_held_plus_update(
    max_rank: int | None, tau: float
) -> None:
    held = HeldUpdates(max_rank=max_rank, tau=tau)
    reference = {name: torch.zeros(m, n, dtype=torch.float64) for name, (m, n) in SHAPES.items()}
    for t in range(3):
        u = update(10 + t)
        held.fold(u)
        for name in SHAPES:
            target = reference[name] + u[name].delta(torch.float64)  # what was held, plus this round
            S = torch.linalg.svdvals(target)
            energy = torch.cumsum(S.square(), 0) / S.square().sum()
            p = int((energy < tau - 1e-12).sum()) + 1 if tau < 1 else len(S)
            p = min(p, max_rank or p, int((1e-9 * S[0] < S).sum()))  # at most its true rank
            reference[name] = best_rank(target, p)
            got = held.modules[name]
            assert got.rank == p
            torch.testing.assert_close(got.delta(torch.float64), reference[name], rtol=1e-4, atol=1e-4)
            kept = float(S[:p].square().sum() / S.square().sum())
            assert held.energy_kept[name] == pytest.approx(kept, abs=1e-6)


def test_the_same_folds_give_the_same_digest_and_a_different_update_another() -> None:
    one, two, other = HeldUpdates(max_rank=4), HeldUpdates(max_rank=4), HeldUpdates(max_rank=4)
    for t in range(3):
        one.fold(update(t))
        two.fold(update(t))
        other.fold(update(t if t < 2 else 99))
    assert one.digest(sorted(SHAPES)) == two.digest(sorted(SHAPES)) != other.digest(sorted(SHAPES))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def cfg_for(model_dir: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f"model.name={str(model_dir)!r}", "federation.num_clients=2", "data.skills_train=6",
                              "data.skills_test=2", "train.steps=2", "train.batch_size=2", "lora.ranks=[4]",
                              "train.lr=0.01", *overrides])  # fmt: skip


def test_beside_a_base_the_model_is_the_base_plus_every_merged_update(model_dir: Path) -> None:
    """On a plain fp32 base (so a dense reference exists): the client's model with held updates and a
    warm split gives the logits of W0 + sum of the updates merged into the weights."""
    cfg = cfg_for(model_dir, "aggregation.method='florist'", "lora.warm_start=true")
    model, tok = load_model(str(model_dir))
    client = client_from_config(
        cfg, 0, model, tok, client_examples(cfg.data, 0, 2), ClientProtocol.MERGE_AND_RESTART
    )
    client.base = BesideBase(client.model, HeldUpdates())
    reference, _ = load_model(str(model_dir))
    shapes = adapted_shapes(reference, cfg.lora.target_modules)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB_SIZE, (2, 11), generator=g)
    for t in (1, 2):
        up = {name: LoraFactors(A=0.3 * torch.randn(3, n, generator=g), B=0.3 * torch.randn(m, 3, generator=g),
                                scaling=2.0) for name, (m, n) in shapes.items()}  # fmt: skip
        client.receive(up, round=t)
        client._warm_start(client.pending_warm)  # the warm split fit() begins with: the model is unchanged
        client.model.train(False)  # no LoRA dropout
        with torch.no_grad():
            for name, f in up.items():
                reference.get_submodule(name).weight.add_(f.delta())
            torch.testing.assert_close(client.model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    plain = {name: layer.get_base_layer().weight for name, layer in lora_layers(client.model)}
    untouched, _ = load_model(str(model_dir))
    for name, W in plain.items():
        assert torch.equal(W, untouched.get_submodule(name).weight)  # the base never moved


def test_nf4_clients_and_the_server_hold_the_same_global_adapter(model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (make install has it)")
    cfg = cfg_for(model_dir, "model.quantization='nf4'", "aggregation.method='florist'", "aggregation.tau=0.9",
                  "lora.warm_start=true", "model.global_adapter_max_rank=3")  # fmt: skip
    clients = []
    for k in range(2):
        model, tok = load_client_model(cfg)
        clients.append(
            client_from_config(cfg, k, model, tok, client_examples(cfg.data, k, 2), cfg.aggregator().protocol)
        )
    server_model, tok = load_model(str(model_dir))
    server = GlobalModel(server_model, tok, cfg.aggregator().protocol, cfg.held_updates())
    names = [name for name, _ in lora_layers(clients[0].model)]
    agg = cfg.aggregator()
    for t in (1, 2, 3):
        updates = [c.fit(t)[0] for c in clients]
        result = agg.aggregate(updates)
        server.apply_result(t, result)
        for c in clients:
            c.receive(result.global_update, round=t)
            assert c.base.digest() == server.digest(names)
    assert max(clients[0].base.held.ranks().values()) == 3  # capped at 3 though 3 rounds were merged
    assert all(
        type(layer.get_base_layer()).__name__ == "Linear4bit" for _, layer in lora_layers(clients[0].model)
    )
    W0, _ = load_model(str(model_dir))
    for name, f in clients[0].base.held.modules.items():  # the server's weights are W0 + G
        torch.testing.assert_close(
            server.weight(name), W0.get_submodule(name).weight + f.delta(), rtol=0, atol=1e-6
        )


def test_config_rules_for_a_quantized_base() -> None:
    for method in ("florist", "flora", "fedex"):  # merge methods now run on a quantized base
        cfg = load_config(
            None, ["model.quantization='nf4'", f"aggregation.method={method!r}", "aggregation.tau=none"]
        )
        assert cfg.held_updates() is not None
    assert load_config(None, ["model.quantization='nf4'", "aggregation.method='fedit'",
                              "aggregation.tau=none"]).held_updates() is None  # fmt: skip
    assert load_config(None, ["aggregation.method='florist'"]).held_updates() is None
    with pytest.raises(ConfigError, match="gradient of the base weights"):
        load_config(None, ["model.quantization='nf4'", "aggregation.method='fedsb'", "aggregation.tau=none"])
    with pytest.raises(ConfigError, match="with model.quantization = 'none' they merge into it"):
        load_config(None, ["model.global_adapter_max_rank=8"])
    with pytest.raises(ConfigError, match="hold no global adapter to cap"):
        load_config(None, ["model.quantization='nf4'", "model.global_adapter_tau=0.9", "aggregation.method='fedit'",
                           "aggregation.tau=none"])  # fmt: skip
    with pytest.raises(ConfigError, match="must be in"):
        load_config(None, ["model.quantization='nf4'", "model.global_adapter_tau=0"])
