"""Each client protocol's rules (florist.aggregation.protocols), on fabricated results."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.aggregation.protocols import ClientRules, protocol_of
from florist.lora import LoraFactors


def _factors(rank: int, seed: int) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {"m": LoraFactors(A=torch.randn(rank, 5, generator=g), B=torch.randn(4, rank, generator=g))}


def _result(kind: ClientProtocol, rank: int = 3, seed: int = 0) -> AggregationResult:
    return AggregationResult(method="x", protocol=kind, global_update=_factors(rank, seed))


@pytest.mark.parametrize("kind", list(ClientProtocol))
def test_every_protocol_has_rules_and_they_agree_with_its_name(kind: ClientProtocol) -> None:
    rules = protocol_of(kind)
    assert isinstance(rules, ClientRules) and rules.kind is kind and protocol_of(rules) is rules
    assert rules.merges == (kind in (ClientProtocol.MERGE_AND_RESTART, ClientProtocol.MERGE_AND_CONTINUE))
    assert rules.sends_a == (kind is not ClientProtocol.FROZEN_SHARED_A)
    b_only_up = (ClientProtocol.FROZEN_SHARED_A, ClientProtocol.TRAIN_B_ON_SERVER_A)
    assert rules.uploads_a == (kind not in b_only_up)
    assert rules.fits_warm_start == (kind is ClientProtocol.MERGE_AND_RESTART)


def test_merge_protocols_download_the_global_update_and_end_with_the_sum_of_rounds() -> None:
    rules = protocol_of(ClientProtocol.MERGE_AND_RESTART)
    r1, r2 = _result(ClientProtocol.MERGE_AND_RESTART, 3, 0), _result(ClientProtocol.MERGE_AND_RESTART, 2, 1)
    assert rules.download(r1, "c", rank=1) is r1.global_update  # the whole update, whatever the rank
    total = rules.final([r1.global_update, r2.global_update])["m"].delta(torch.float64)
    want = r1.global_update["m"].delta(torch.float64) + r2.global_update["m"].delta(torch.float64)
    torch.testing.assert_close(total, want)
    assert rules.round_start([r1]) is None  # a merge client's change starts at B = 0


def test_continue_protocols_download_their_slice_and_end_with_the_latest_adapter() -> None:
    rules = protocol_of(ClientProtocol.CONTINUE_GLOBAL)
    r1, r2 = _result(ClientProtocol.CONTINUE_GLOBAL, 3, 0), _result(ClientProtocol.CONTINUE_GLOBAL, 3, 1)
    down = rules.download(r1, "c", rank=2)["m"]
    assert down.rank == 2 and torch.equal(down.A, r1.global_update["m"].A[:2])
    assert rules.final([r1.global_update, r2.global_update]) == r2.global_update
    assert rules.round_start([r1, r2]) is r2.global_update
    assert rules.round_one_key("per_client") == "shared"  # FedAvg: every client from the shared draw
    assert protocol_of(ClientProtocol.FROZEN_SHARED_A).round_one_key("shared") is None


def test_fedsvd_uploads_are_taken_against_the_last_a_sent_else_the_seeded_draw() -> None:
    from florist.lora.seeded import seeded_a

    rules = protocol_of(ClientProtocol.TRAIN_B_ON_SERVER_A)
    assert torch.equal(rules.upload_a([], 7, 3, "m", 5), seeded_a(7, "m", 3, 5))
    r1, r2 = (
        _result(ClientProtocol.TRAIN_B_ON_SERVER_A, 3, 0),
        _result(ClientProtocol.TRAIN_B_ON_SERVER_A, 3, 1),
    )
    assert torch.equal(rules.upload_a([r1, r2], 7, 3, "m", 5), r2.global_update["m"].A)
    with pytest.raises(ValueError, match="columns"):
        rules.upload_a([r1], 7, 3, "m", 6)
    with pytest.raises(TypeError, match="upload A"):
        protocol_of(ClientProtocol.CONTINUE_GLOBAL).upload_a([], 7, 3, "m", 5)
    assert (
        rules.download(r1, "c", rank=2)["m"].rank == 2 and rules.final([r1.global_update]) == r1.global_update
    )


def test_fedex_continues_from_its_leading_columns_and_its_change_starts_there() -> None:
    from florist.lora import ClientUpdate

    rules = protocol_of(ClientProtocol.MERGE_AND_CONTINUE)
    r1 = _result(ClientProtocol.MERGE_AND_CONTINUE, 3, 0)
    warm = rules.warm_part(r1.global_update, 2, "orthonormal")["m"]
    assert torch.equal(warm.A, r1.global_update["m"].A[:2])
    up = ClientUpdate("c", 1.0, _factors(2, 5))
    (delta,) = rules.deltas([up], [r1], {"c": 2})
    assert delta.start is not None and torch.equal(delta.start["m"].B, r1.global_update["m"].B[:, :2])
    with pytest.raises(TypeError, match="do not warm-start"):
        protocol_of(ClientProtocol.CONTINUE_GLOBAL).warm_part(r1.global_update, 2, "orthonormal")
