"""FLoRA, FedIT, FlexLoRA and FFA-LoRA against dense references, on products."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import ClientProtocol, EnergyThreshold, available, make_aggregator
from florist.errors import ConfigError, InvalidUpdate
from florist.lora import ClientUpdate, LoraFactors
from tests.helpers import SHAPES, assert_product_close, best_rank_p, dense_reference, make_updates


def test_registry_lists_every_method() -> None:
    assert available() == [
        "fedex",
        "fedit",
        "fedsb",
        "fedsvd",
        "ffa",
        "flexlora",
        "flora",
        "florist",
        "rblora",
    ]
    with pytest.raises(ConfigError, match="unknown aggregation method 'fedavg'"):
        make_aggregator("fedavg")
    with pytest.raises(ConfigError, match="bad options for method 'flora'"):
        make_aggregator("flora", tau=0.9)


def test_protocols() -> None:
    protocols = {name: make_aggregator(name).protocol for name in available()}
    assert protocols == {
        "florist": ClientProtocol.MERGE_AND_RESTART,
        "flora": ClientProtocol.MERGE_AND_RESTART,
        "fedit": ClientProtocol.CONTINUE_GLOBAL,
        "flexlora": ClientProtocol.CONTINUE_PER_CLIENT,
        "ffa": ClientProtocol.FROZEN_SHARED_A,
        "rblora": ClientProtocol.CONTINUE_GLOBAL,
        "fedex": ClientProtocol.MERGE_AND_CONTINUE,
        "fedsvd": ClientProtocol.TRAIN_B_ON_SERVER_A,
        "fedsb": ClientProtocol.TRAIN_CORE,
    }


def test_flora_is_exact_with_stacked_rank(hetero_updates: list[ClientUpdate]) -> None:
    result = make_aggregator("flora").aggregate(hetero_updates)
    for name in SHAPES:
        assert result.ranks[name] == 8 + 4 + 2 + 4
        assert_product_close(result.global_update[name].delta(), dense_reference(hetero_updates, name))


def test_flora_passes_on_no_clients_factorisation() -> None:
    """A client whose B is near zero beside a huge A (within the factor bounds), or whose columns
    cancel, changes FLoRA's download only through its product: the stack holds balanced factors of
    each client's update, the product stays exact and the rank stays the sum of the ranks."""
    updates = make_updates([4, 4, 2], dtype=torch.float64)
    odd = updates[1].modules["layers.0.q_proj"]
    b, a = odd.B[:, :2], odd.A[:2]
    skewed = LoraFactors(A=torch.cat([1e3 * a, 1e3 * a]), B=torch.cat([1e-3 * b, -1e-3 * b], 1), scaling=2.0)
    mods = {**updates[1].modules, "layers.0.q_proj": skewed}  # its product is zero
    updates[1] = ClientUpdate(updates[1].client_id, updates[1].num_examples, mods)
    result = make_aggregator("flora", dtype=torch.float64).aggregate(updates)
    for name in SHAPES:
        g = result.global_update[name]
        assert g.rank == 10
        exact = dense_reference(updates, name)
        assert float((g.delta(torch.float64) - exact).norm() / exact.norm()) < 1e-10
        assert float(g.A.abs().max()) < 50 and float(g.B.abs().max()) < 50  # nothing of the 1e3 A
    honest = make_updates([4, 4, 2], dtype=torch.float64)
    plain = make_aggregator("flora", dtype=torch.float64).aggregate(honest)
    for name in SHAPES:  # an honest round: the same product as stacking the raw factors
        assert_product_close(plain.global_update[name].delta(), dense_reference(honest, name))


def test_fedit_differs_from_exact_when_clients_differ(hetero_updates: list[ClientUpdate]) -> None:
    result = make_aggregator("fedit").aggregate(hetero_updates)
    for name in SHAPES:
        exact = dense_reference(hetero_updates, name)
        err = (result.global_update[name].delta(torch.float64) - exact).norm() / exact.norm()
        assert err > 0.1, f"{name}: FedIT should miss the cross terms, relative error {err:.3g}"


def test_fedit_is_exact_when_all_a_are_equal() -> None:
    updates = make_updates([4, 4, 4], shared_a=True)
    result = make_aggregator("fedit").aggregate(updates)
    for name in SHAPES:
        assert_product_close(result.global_update[name].delta(), dense_reference(updates, name))


def test_fedit_zero_pads_mixed_ranks_and_slices_per_client(hetero_updates: list[ClientUpdate]) -> None:
    result = make_aggregator("fedit").aggregate(hetero_updates)
    total = sum(u.num_examples for u in hetero_updates)
    for name in SHAPES:
        want_A = sum(
            u.num_examples
            / total
            * torch.nn.functional.pad(u.modules[name].A, (0, 0, 0, 8 - u.modules[name].rank))
            for u in hetero_updates
        )
        torch.testing.assert_close(result.global_update[name].A, want_A)
    assert result.per_client is not None
    for u in hetero_updates:
        got = result.download(u.client_id)
        for name in SHAPES:
            assert got[name].rank == u.modules[name].rank
            torch.testing.assert_close(got[name].A, result.global_update[name].A[: u.modules[name].rank])


def test_ffa_is_exact_with_mixed_ranks() -> None:
    updates = make_updates([8, 4, 2, 8], shared_a=True)
    result = make_aggregator("ffa").aggregate(updates)
    assert result.sends_a is False
    for name in SHAPES:
        assert_product_close(result.global_update[name].delta(), dense_reference(updates, name))


def test_ffa_rejects_a_client_whose_a_moved() -> None:
    updates = make_updates([4, 4], shared_a=True)
    name = "layers.0.v_proj"
    moved = dict(updates[1].modules)
    moved[name] = LoraFactors(A=moved[name].A + 0.1, B=moved[name].B, scaling=moved[name].scaling)
    updates[1] = ClientUpdate("client-1", updates[1].num_examples, moved)
    with pytest.raises(InvalidUpdate, match=r"client 'client-1', module 'layers.0.v_proj': lora_A differs"):
        make_aggregator("ffa").aggregate(updates)


def test_flexlora_truncates_to_each_clients_own_rank(hetero_updates: list[ClientUpdate]) -> None:
    result = make_aggregator("flexlora").aggregate(hetero_updates)
    assert result.per_client is not None
    for u in hetero_updates:
        got = result.download(u.client_id)
        for name in SHAPES:
            r = u.modules[name].rank
            assert got[name].rank == r
            assert_product_close(
                got[name].delta(), best_rank_p(dense_reference(hetero_updates, name), r), 1e-4
            )
    a, b = result.download("client-0"), result.download("client-2")
    for name in SHAPES:
        assert a[name].B.data_ptr() != b[name].B.data_ptr(), "clients must not share one truncation"
        assert a[name].rank != b[name].rank


@pytest.mark.parametrize("method", ["florist", "flora", "fedit", "flexlora", "ffa", "rblora", "fedex"])
def test_ranks_above_the_matrix_size(method: str) -> None:
    """A client rank above min(m, n) (peft allows it): every method aggregates, downloads keep the
    client's rank, and the exact methods still reproduce sum_k p_k B_k A_k."""
    shapes = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16)}
    updates = make_updates([32, 4], shapes=shapes, shared_a=method == "ffa")
    options = {"policy": EnergyThreshold(1.0)} if method == "florist" else {}
    result = make_aggregator(method, **options).aggregate(updates)
    for u in updates:
        for name, f in result.download(u.client_id).items():
            assert f.rank == u.modules[name].rank or result.per_client is None
    if method not in (
        "fedit",
        "rblora",
    ):  # flexlora at rank >= min(m, n) keeps everything, so it is exact here too
        for name in shapes:
            assert_product_close(
                result.global_update[name].delta(torch.float64), dense_reference(updates, name)
            )


PAPER_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]  # the paper's heterogeneous setting


def test_rblora_weights_each_slot_by_the_clients_that_have_it() -> None:
    """Dense float64 reference: slot j averages only the clients with r_k > j, weights n_k renormalised."""
    shapes = {"layers.0.q_proj": (80, 72), "layers.0.v_proj": (24, 72)}
    updates = make_updates(PAPER_RANKS, shapes=shapes, sizes=[100.0 * (k + 1) for k in range(8)])
    result = make_aggregator("rblora", dtype=torch.float64).aggregate(updates)
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    for name, (m, cols) in shapes.items():
        want = torch.zeros(m, cols, dtype=torch.float64)
        for j in range(max(PAPER_RANKS)):
            have = [k for k, u in enumerate(updates) if u.modules[name].rank > j]
            w = n[have] / n[have].sum()
            b = sum(
                wk * updates[k].modules[name].effective(torch.float64)[0][:, j]
                for k, wk in zip(have, w, strict=True)
            )
            a = sum(
                wk * updates[k].modules[name].effective(torch.float64)[1][j]
                for k, wk in zip(have, w, strict=True)
            )
            want += torch.outer(b, a)  # type: ignore[arg-type]
        assert_product_close(result.global_update[name].delta(torch.float64), want)
    assert result.download(updates[7].client_id)[name].rank == 4  # its own slice


def test_rblora_is_fedit_with_equal_ranks_and_upweights_high_slots_otherwise() -> None:
    same = make_updates([8, 8, 8])
    a = make_aggregator("rblora", dtype=torch.float64).aggregate(same)
    b = make_aggregator("fedit", dtype=torch.float64).aggregate(same)
    for name in a.global_update:
        assert_product_close(
            a.global_update[name].delta(torch.float64), b.global_update[name].delta(torch.float64)
        )
    mixed = make_updates(PAPER_RANKS)
    rb = make_aggregator("rblora", dtype=torch.float64).aggregate(mixed)
    fedit = make_aggregator("fedit", dtype=torch.float64).aggregate(mixed)
    name = next(iter(rb.global_update))
    ratio = rb.global_update[name].B[:, 40].norm() / fedit.global_update[name].B[:, 40].norm()
    p_top = mixed[0].num_examples / sum(u.num_examples for u in mixed)  # only client 0 has slot 40
    assert float(ratio) == pytest.approx(1 / p_top, rel=1e-9)
