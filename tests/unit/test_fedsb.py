"""Fed-SB: the averaged core against a dense float64 reference, LoRA-SB's starting basis, the clients'
protocol (B and A frozen, only the r x r core trained and sent), its bytes and its checkpoint."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from florist.aggregation import communication, make_aggregator
from florist.aggregation.fedsb import default_init_lr, init_shares, sign_step_basis
from florist.aggregation.protocols import protocol_of
from florist.client.lora_state import extract
from florist.config import load_config
from florist.errors import ConfigError, InvalidUpdate
from florist.lora import ClientUpdate, LoraFactors
from florist.server.checkpoint import ServerState, load_latest, save
from tests.unit.test_local_client import _clients

F64 = torch.float64
SHAPES = {"a": (12, 9), "b": (6, 9)}


def _basis(rank: int, seed: int = 0) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in SHAPES.items():
        B = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=F64))[0].float()
        A = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=F64))[0].T.contiguous().float()
        out[name] = LoraFactors(A=A, B=B, core=torch.zeros(rank, rank))
    return out


def _updates(rank: int, sizes: tuple[float, ...], scaling: float = 2.0) -> list[ClientUpdate]:
    basis, g = _basis(rank), torch.Generator().manual_seed(7)
    return [
        ClientUpdate(
            f"c{k}",
            n,
            {
                name: replace(b, core=torch.randn(rank, rank, generator=g), scaling=scaling)
                for name, b in basis.items()
            },
        )
        for k, n in enumerate(sizes)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_update_is_b_times_the_weighted_mean_core_times_a(dtype: torch.dtype) -> None:
    updates = _updates(4, (3.0, 1.0, 6.0))
    result = make_aggregator("fedsb", dtype=dtype).aggregate(updates)
    p = torch.tensor([3.0, 1.0, 6.0], dtype=F64) / 10
    for name in SHAPES:
        B, A = updates[0].modules[name].B.to(F64), updates[0].modules[name].A.to(F64)
        core = sum(p[k] * 2.0 * u.modules[name].core.to(F64) for k, u in enumerate(updates))  # type: ignore[union-attr]
        want = B @ core @ A  # dense: B (sum_k p_k s_k R_k) A
        exact = sum(p[k] * u.modules[name].delta(F64) for k, u in enumerate(updates))  # sum p_k dW_k
        got = result.global_update[name].delta(F64)
        tol = 1e-12 if dtype == F64 else 1e-6
        assert float((got - want).norm() / want.norm()) < tol
        assert float((got - exact).norm() / exact.norm()) < tol
        assert result.global_update[name].core is not None  # the download is the core on the basis
    assert result.per_client is None


def test_cores_on_another_basis_are_refused_by_name() -> None:
    updates = _updates(3, (1.0, 1.0))
    f = updates[1].modules["a"]
    updates[1] = replace(updates[1], modules={**updates[1].modules, "a": replace(f, B=f.B + 0.1)})
    with pytest.raises(InvalidUpdate, match="Fed-SB needs every core on one basis"):
        make_aggregator("fedsb").aggregate(updates)
    no_core = replace(updates[1], modules={**updates[1].modules, "a": replace(f, core=None)})
    with pytest.raises(InvalidUpdate):
        make_aggregator("fedsb").aggregate([updates[0], no_core])


def test_the_server_puts_its_own_basis_around_each_core() -> None:
    """A client that sends another basis (or none) has only its core used: the server's basis is
    what the last result sent."""
    updates = _updates(3, (1.0, 2.0))
    sent = make_aggregator("fedsb").aggregate(updates)
    rules = protocol_of(sent.protocol)
    forged = {n: replace(f, B=f.B * 100, A=torch.zeros_like(f.A)) for n, f in updates[1].modules.items()}
    deltas = rules.deltas([replace(updates[1], modules=forged)], [sent], {"c1": 3})
    for name, f in deltas[0].modules.items():
        assert f.B is sent.global_update[name].B and f.A is sent.global_update[name].A
        assert torch.equal(f.core, updates[1].modules[name].core)  # type: ignore[arg-type]
    bare = {n: LoraFactors(A=f.A, B=f.B) for n, f in updates[1].modules.items()}
    with pytest.raises(InvalidUpdate, match="carries the core"):
        rules.deltas([replace(updates[1], modules=bare)], [sent], {"c1": 3})


def test_starting_basis_is_the_sign_steps_rank_r_svd() -> None:
    """A rank-1 gradient has a rank-1 sign step: the basis reproduces it exactly, B has orthonormal
    columns, A orthonormal rows, the core is diagonal and non-negative; ranks above min(m, n) pad."""
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(12, 1, generator=g), torch.randn(1, 9, generator=g)
    f = sign_step_basis(u @ v, rank=1, lr=0.01)
    step = -0.01 * torch.sign(u @ v)
    torch.testing.assert_close(f.delta(F64), step.to(F64), atol=1e-6, rtol=1e-6)
    G = torch.randn(12, 9, generator=g)
    f = sign_step_basis(G, rank=4, lr=0.5)
    torch.testing.assert_close(f.B.T @ f.B, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(4), atol=1e-5, rtol=0)
    assert f.core is not None and bool((f.core == torch.diag(torch.diagonal(f.core))).all())
    best = torch.linalg.svdvals((-0.5 * torch.sign(G)).to(F64))[:4]  # the leading singular values
    torch.testing.assert_close(torch.diagonal(f.core).to(F64), best, rtol=0.05, atol=0)
    wide = sign_step_basis(torch.randn(5, 6, generator=g), rank=8, lr=1.0)
    assert wide.B.shape == (5, 8) and wide.A.shape == (8, 6) and float(wide.A[5:].abs().max()) == 0.0
    assert init_shares(170, [100, 300, 100]) == [34, 102, 34]
    assert default_init_lr(1e-3, 80) == pytest.approx(1e-3 / (0.02 * 80))  # the reference's rate
    assert default_init_lr(1e-3, 50) == default_init_lr(1e-3, 12) == 1e-3  # a warmup under a step: lr


def test_clients_train_only_the_core_and_match_the_server() -> None:
    clients = _clients("fedsb", ranks=(4, 4))
    agg = make_aggregator("fedsb")
    grads = [c.init_gradient(3) for c in clients]
    for grad in grads:
        assert set(grad) == set(extract(clients[0].model)) and all(
            float(t.abs().max()) > 0 for t in grad.values()
        )
    start = agg.initial(grads, rank=4, lr=1e-3, wire="bfloat16")
    base = {n: c.model.get_submodule(f"base_model.model.{n}").get_base_layer().weight.detach().clone()
            for c in clients[:1] for n in start.global_update}  # fmt: skip
    for c in clients:
        c.receive(start.download(c.client_id), round=0)
        for name, f in extract(c.model).items():  # W0 + B R_0 A, the basis frozen, R trainable
            torch.testing.assert_close(f.delta(), start.global_update[name].delta(), rtol=1e-5, atol=1e-8)
            assert f.core is not None and torch.equal(f.B, start.global_update[name].B)
    trainable = [n for n, p in clients[0].model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("parametrizations.weight.original") for n in trainable)
    updates = [c.fit(1)[0] for c in clients]
    for u in updates:
        for name, f in u.modules.items():  # only R moved
            g = start.global_update[name]
            assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B)
            assert not torch.equal(f.core * f.scaling, g.core)  # type: ignore[operator]
    rules = protocol_of(agg.protocol)
    result = agg.aggregate(rules.deltas(updates, [start], {c.client_id: 4 for c in clients}))
    for c in clients:
        c.receive(result.download(c.client_id), round=1)
        for name, f in extract(c.model).items():
            torch.testing.assert_close(
                f.delta(F64), result.global_update[name].delta(F64), rtol=1e-5, atol=1e-9
            )
            W0 = c.model.get_submodule(f"base_model.model.{name}").get_base_layer().weight
            assert torch.equal(W0, base[name])  # the base weights never change
    report = communication(updates, result, "bfloat16")
    assert (
        report.uplink_total == report.downlink_total == len(updates) * len(result.global_update) * 4 * 4 * 2
    )  # r^2 bf16


def test_checkpoint_keeps_the_core(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["aggregation.method='fedsb'"])
    result = make_aggregator("fedsb").aggregate(_updates(3, (1.0, 2.0)))
    save(tmp_path, ServerState(round=1, history=[(0, result), (1, result)]), cfg, keep=1)
    back = load_latest(tmp_path, cfg, force=False).history
    for name, f in result.global_update.items():
        g = back[1][1].global_update[name]
        assert g.core is not None and torch.equal(g.core, f.core) and torch.equal(g.B, f.B)  # type: ignore[arg-type]


def test_config_refuses_what_fedsb_cannot_do() -> None:
    with pytest.raises(ConfigError, match="one r x r core"):
        load_config(None, ["aggregation.method='fedsb'", "federation.num_clients=2", "lora.ranks=[4, 2]"])
    with pytest.raises(ConfigError, match=r"does not take aggregation.clip \(its clients' upload holds"):
        load_config(None, ["aggregation.method='fedsb'", "aggregation.clip='median'"])
    with pytest.raises(ConfigError, match="init_samples"):
        load_config(None, ["aggregation.method='fedsb'", "aggregation.init_samples=0"])
    with pytest.raises(ConfigError, match="init_lr"):
        load_config(None, ["aggregation.method='fedsb'", "aggregation.init_lr=-1.0"])


def test_wire_carries_the_core_and_the_basis_once() -> None:
    from flwr.app import ArrayRecord

    from florist.flower.codec import (
        basis_of,
        check_declared_cores,
        decode_cores,
        encode_factors,
        encode_upload,
    )

    result = make_aggregator("fedsb").aggregate(_updates(3, (1.0, 2.0)))
    g = result.global_update
    first = encode_factors(g, wire="bfloat16")  # to a node without the basis
    later = encode_factors(g, wire="bfloat16", with_basis=False)
    assert sorted(later) == sorted(f"{n}.lora_R" for n in SHAPES) and len(first) == 3 * len(SHAPES)
    held = basis_of(first)
    whole = decode_cores(first, "server")  # the basis as rounded (a run's basis is rounded once, in round 0)
    for name, f in decode_cores(later, "server", basis=held).items():
        assert torch.equal(f.delta(), whole[name].delta())
        torch.testing.assert_close(f.core, g[name].core.to(torch.bfloat16).float())  # type: ignore[union-attr]
    with pytest.raises(InvalidUpdate, match="without its basis"):
        decode_cores(later, "server")
    arrays, _ = encode_upload(_updates(3, (1.0,))[0].modules, wire="bfloat16")
    check_declared_cores(arrays, "c0", SHAPES, "bfloat16", 3)
    with pytest.raises(InvalidUpdate, match="claims shape"):
        check_declared_cores(arrays, "c0", SHAPES, "bfloat16", 2)
    forged = ArrayRecord(array_dict={**dict(arrays.items()), **dict(first.items())})  # a basis of its own
    with pytest.raises(InvalidUpdate, match="unexpected array"):
        check_declared_cores(forged, "c0", SHAPES, "bfloat16", 3)


def test_round_zero_replies_are_checked_before_they_count() -> None:
    from flwr.app import ArrayRecord

    from florist.flower.codec import decode_gradient, encode_gradient

    grads = {name: torch.randn(m, n) for name, (m, n) in SHAPES.items()}
    record = encode_gradient(grads, "bfloat16")
    got = decode_gradient(record, "c0", SHAPES, "bfloat16")
    assert all(torch.equal(got[n], grads[n].to(torch.bfloat16).float()) for n in SHAPES)
    with pytest.raises(InvalidUpdate, match="takes bfloat16"):
        decode_gradient(encode_gradient(grads, "float32"), "c0", SHAPES, "bfloat16")
    with pytest.raises(InvalidUpdate, match="lacks a gradient"):
        decode_gradient(encode_gradient({"a": grads["a"]}, "bfloat16"), "c0", SHAPES, "bfloat16")
    with pytest.raises(InvalidUpdate, match="out of range"):
        decode_gradient(
            encode_gradient({**grads, "a": grads["a"] * 1e9}, "bfloat16"), "c0", SHAPES, "bfloat16"
        )
    with pytest.raises(InvalidUpdate, match="takes bfloat16"):
        decode_gradient(
            encode_gradient({**grads, "a": torch.zeros(3, 3)}, "bfloat16"), "c0", SHAPES, "bfloat16"
        )
    extra = ArrayRecord(array_dict={**dict(record.items()), "../x.grad": next(iter(record.values()))})
    with pytest.raises(InvalidUpdate, match="unexpected array"):
        decode_gradient(extra, "c0", SHAPES, "bfloat16")
