"""FedSVD: the re-factorised global update against a dense float64 reference, its clients' protocol
(A frozen and the server's, only B trained and uploaded) and the wire's B-only uploads."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import communication, make_aggregator
from florist.aggregation.fedsvd import refactorise
from florist.aggregation.protocols import protocol_of
from florist.client.lora_state import extract
from florist.errors import InvalidUpdate
from florist.flower.codec import KnownA, decode_upload, encode_upload
from florist.lora import ClientUpdate, LoraFactors
from tests.helpers import SHAPES, best_rank_p, dense_reference, make_updates
from tests.unit.test_local_client import _clients

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_update_is_the_weighted_sum_with_orthonormal_a(dtype: torch.dtype) -> None:
    updates = make_updates([4, 4, 4], shared_a=True, dtype=dtype)
    result = make_aggregator("fedsvd", dtype=dtype).aggregate(updates)
    tol = 1e-10 if dtype == F64 else 2e-5
    for name, (m, n) in SHAPES.items():
        g = result.global_update[name]
        assert g.A.shape == (4, n) and g.B.shape == (m, 4)
        want = dense_reference(updates, name)  # sum_k p_k s_k B_k A  (one A)
        got = g.B.to(F64) @ g.A.to(F64)
        assert float((got - want).norm() / want.norm()) < tol, name
        eye = g.A.to(F64) @ g.A.to(F64).T
        assert float((eye - torch.eye(4, dtype=F64)).abs().max()) < 10 * tol  # orthonormal rows
        # the singular values live in B: B's columns are orthogonal with norms = sigma, descending
        norms = g.B.to(F64).norm(dim=0)
        sigma = torch.linalg.svdvals(want)[:4]
        torch.testing.assert_close(norms, sigma, rtol=10 * tol, atol=10 * tol * float(sigma[0]))
    assert result.sends_a and result.per_client is None
    assert set(result.energy_kept.values()) == {1.0}


def test_refactorise_keeps_the_product_and_fixes_signs() -> None:
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    f = refactorise(B, A)
    torch.testing.assert_close(f.B @ f.A, B @ A)
    torch.testing.assert_close(refactorise(-B, A).B @ refactorise(-B, A).A, -(B @ A))
    lead = f.A.gather(1, f.A.abs().argmax(dim=1, keepdim=True))
    assert bool((lead > 0).all()), "the largest entry of each row of A is positive"
    # a rank-deficient product keeps its shapes (zero singular values kept)
    Z = refactorise(torch.cat([B[:, :1], torch.zeros(12, 2, dtype=F64)], 1), A)
    assert Z.A.shape == (3, 7) and Z.B.shape == (12, 3)
    torch.testing.assert_close(Z.B @ Z.A, B[:, :1] @ A[:1], atol=1e-12, rtol=0)
    # a rank above min(m, n) (LoRA rank 8 on a 5 x 6 weight): the shapes stay, the extra rows are zero
    B8, A8 = torch.randn(5, 8, generator=g, dtype=F64), torch.randn(8, 6, generator=g, dtype=F64)
    W = refactorise(B8, A8)
    assert W.A.shape == (8, 6) and W.B.shape == (5, 8)
    torch.testing.assert_close(W.B @ W.A, B8 @ A8)
    assert float(W.A[5:].abs().max()) == 0.0 and float(W.B[:, 5:].abs().max()) == 0.0
    torch.testing.assert_close(W.A[:5] @ W.A[:5].T, torch.eye(5, dtype=F64))


def test_lower_rank_clients_download_the_best_approximation_of_their_rank() -> None:
    updates = make_updates([8, 4, 2], shared_a=True, dtype=F64)
    result = make_aggregator("fedsvd", dtype=F64).aggregate(updates)
    assert result.per_client is not None
    for u in updates:
        for name in SHAPES:
            r = u.modules[name].rank
            mine = result.download(u.client_id)[name]
            assert mine.rank == r
            want = best_rank_p(dense_reference(updates, name), r)
            assert float((mine.B @ mine.A - want).norm() / want.norm()) < 1e-10


def test_a_client_that_changed_a_is_refused_by_name() -> None:
    updates = make_updates([4, 4], shared_a=True)
    bad = updates[1].modules["layers.0.q_proj"]
    forged = {
        **updates[1].modules,
        "layers.0.q_proj": LoraFactors(A=bad.A + 0.1, B=bad.B, scaling=bad.scaling),
    }
    updates[1] = ClientUpdate(updates[1].client_id, updates[1].num_examples, forged)
    with pytest.raises(InvalidUpdate, match="FedSVD needs every client to keep the shared frozen A"):
        make_aggregator("fedsvd").aggregate(updates)


def test_bytes_b_up_b_and_a_down() -> None:
    updates = make_updates([4, 2], shared_a=True)
    result = make_aggregator("fedsvd").aggregate(updates)
    report = communication(updates, result, "bfloat16")
    assert report.uplink_total == sum(f.B.numel() * 2 for u in updates for f in u.modules.values())
    down = sum(f.B.numel() + f.A.numel() for u in updates for f in result.download(u.client_id).values())
    assert report.downlink_total == down * 2


def test_clients_train_only_b_against_the_servers_a_and_upload_only_b() -> None:
    clients = _clients("fedsvd", ranks=(4, 4))
    rules = protocol_of(clients[0].protocol)
    a0 = {n: f.A.clone() for n, f in extract(clients[0].model).items()}
    updates = [c.fit(1)[0] for c in clients]
    for u in updates:  # round 1: the seeded draw, the same on every client, untouched by training
        for name, f in u.modules.items():
            assert torch.equal(f.A, a0[name]) and float(f.B.abs().max()) > 0
            assert torch.equal(f.A, rules.upload_a([], 0, 4, name, f.A.shape[1]))
    result = make_aggregator("fedsvd").aggregate(updates)
    for c in clients:
        c.receive(result.download(c.client_id), round=1)
        for name, f in extract(c.model).items():  # the client's adapter is the global one
            g = result.global_update[name]
            torch.testing.assert_close(f.delta(), g.B @ g.A, rtol=1e-5, atol=1e-7)
    second = clients[0].fit(2)[0]
    for name, f in second.modules.items():  # round 2 trained B against the server's new A
        assert torch.equal(f.A, result.global_update[name].A)
        assert not torch.equal(f.B * f.scaling, result.global_update[name].B)
    # on the wire: only B goes up; the server puts back the A it sent
    arrays, meta = encode_upload(second.modules, with_a=rules.uploads_a)
    assert all(k.endswith("lora_B") for k in arrays)
    known = KnownA(4, lambda name, n: rules.upload_a([result], 0, 4, name, n))
    decoded = decode_upload(arrays, meta, "c0", known_a=known)
    for name, f in decoded.items():
        assert torch.equal(f.A, result.global_update[name].A)
        torch.testing.assert_close(f.delta(), second.modules[name].delta())
