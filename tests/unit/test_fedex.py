"""FedEx-LoRA against a dense float64 reference: the global update is the exact aggregate of the
round's changes, it leads with FedIT's averages, and its residual is low-rank and bounded."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from florist.aggregation import ClientProtocol, make_aggregator
from florist.aggregation.lowrank import leading_columns
from florist.lora import ClientUpdate, LoraFactors
from tests.helpers import SHAPES, assert_product_close, dense_reference, make_updates

PAPER_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
WIDE = {"layers.0.q_proj": (96, 80), "layers.0.v_proj": (32, 80)}  # room for the paper's ranks


def _fedex(updates: list[ClientUpdate]):  # type: ignore[no-untyped-def]
    return make_aggregator("fedex", dtype=torch.float64).aggregate(updates)


@pytest.mark.parametrize("ranks", [[4, 4, 4], PAPER_RANKS])
def test_the_global_update_is_the_exact_aggregate_and_leads_with_the_averages(ranks: list[int]) -> None:
    shapes = WIDE if max(ranks) > 8 else SHAPES
    updates = make_updates(ranks, shapes=shapes, dtype=torch.float64)
    result = _fedex(updates)
    fedit = make_aggregator("fedit", dtype=torch.float64).aggregate(updates)
    r_max = max(ranks)
    for name in shapes:
        g = result.global_update[name]
        assert_product_close(g.delta(torch.float64), dense_reference(updates, name))
        lead = leading_columns(result.global_update, r_max)[
            name
        ]  # what a client of rank r_max continues from
        assert_product_close(lead.delta(torch.float64), fedit.global_update[name].delta(torch.float64))
    assert result.protocol is ClientProtocol.MERGE_AND_CONTINUE and result.per_client is None


def test_the_residual_is_what_makes_fedit_exact_and_its_rank_is_bounded() -> None:
    shapes = {"layers.0.q_proj": (96, 80)}
    updates = make_updates([4] * 8, shapes=shapes, dtype=torch.float64)
    g = _fedex(updates).global_update["layers.0.q_proj"]
    B, A = g.effective(torch.float64)
    residual = B[:, 4:] @ A[4:]  # (m, n): everything after the averages
    fedit = make_aggregator("fedit", dtype=torch.float64).aggregate(updates).global_update["layers.0.q_proj"]
    want = dense_reference(updates, "layers.0.q_proj") - fedit.delta(torch.float64)
    assert_product_close(residual, want)
    assert g.rank - 4 == int(torch.linalg.matrix_rank(want)) <= 8 * 4  # numerical rank, at most R
    assert g.rank * sum(shapes["layers.0.q_proj"]) < 96 * 80 + 4 * (96 + 80)  # cheaper than a dense residual


@pytest.mark.parametrize("ranks", [[4, 4, 4], [8, 4, 2]])
def test_with_starts_the_update_is_the_aggregate_of_the_changes(ranks: list[int]) -> None:
    """From round 2 on each client began from its slice of the last global update: the new global
    update is ``sum_k p_k (B_k A_k - S_k)``, so base + merges follows the exact FedAvg of models."""
    first = make_updates(ranks, dtype=torch.float64, seed=1)
    previous = _fedex(first).global_update
    trained = make_updates(ranks, dtype=torch.float64, seed=2)
    started = [replace(u, start=leading_columns(previous, r)) for u, r in zip(trained, ranks, strict=True)]
    result = _fedex(started)
    total = sum(u.num_examples for u in started)
    for name in SHAPES:
        want = sum(u.num_examples / total * u.change(name, torch.float64) for u in started)
        assert isinstance(want, torch.Tensor)
        assert_product_close(result.global_update[name].delta(torch.float64), want)
        assert result.global_update[name].rank <= max(ranks) + min(sum(ranks) + max(ranks), *SHAPES[name])


def test_float32_matches_float64() -> None:
    updates = make_updates([8, 4, 2])
    g32 = make_aggregator("fedex").aggregate(updates).global_update
    for name in SHAPES:
        ref = dense_reference(updates, name)
        err = (g32[name].delta(torch.float64) - ref).norm() / ref.norm()
        assert err < 1e-5, (name, float(err))


def test_change_is_the_upload_less_its_start() -> None:
    f = LoraFactors(A=torch.ones(1, 3), B=torch.full((2, 1), 2.0))
    s = LoraFactors(A=torch.ones(1, 3), B=torch.ones(2, 1))
    u = ClientUpdate("c", 1.0, {"m": f}, start={"m": s})
    torch.testing.assert_close(u.change("m"), torch.ones(2, 3))
    assert torch.equal(replace(u, start=None).change("m"), f.delta())
