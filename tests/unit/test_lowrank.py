"""Uplink thresholding, the warm-start split and its correction, wire rounding: against dense references."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import EnergyThreshold, make_aggregator
from florist.aggregation.lowrank import (
    leading_split,
    prepare_upload,
    result_to_wire,
    to_wire,
    truncate_update,
    warm_parts,
    without_warm_part,
)
from florist.errors import ConfigError
from florist.lora import ClientUpdate, LoraFactors
from tests.helpers import assert_product_close, best_rank_p, dense_reference, make_updates


def _factors(m: int = 24, n: int = 16, r: int = 6, seed: int = 0, decay: float = 0.5) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g) * decay ** torch.arange(r, dtype=torch.float32)
    return LoraFactors(A=torch.randn(r, n, generator=g), B=B, scaling=1.5)


def test_truncate_at_tau_one_is_exact_and_below_it_is_the_best_rank_q() -> None:
    f = _factors()
    exact, kept = truncate_update(f, 1.0)
    assert exact.rank == f.rank and kept == pytest.approx(1.0)
    assert_product_close(exact.delta(torch.float64), f.delta(torch.float64))
    cut, kept = truncate_update(f, 0.9)
    S = torch.linalg.svdvals(f.delta(torch.float64))
    energy = (S.square().cumsum(0) / S.square().sum()).tolist()
    q = next(i + 1 for i, e in enumerate(energy) if e >= 0.9)
    assert cut.rank == q < f.rank and cut.scaling == 1.0
    assert kept == pytest.approx(energy[q - 1], rel=1e-5)
    assert_product_close(cut.delta(torch.float64), best_rank_p(f.delta(torch.float64), q), rtol=1e-4)
    with pytest.raises(ConfigError, match="uplink tau must be in"):
        truncate_update(f, 0.0)


def test_leading_split_is_the_best_rank_r_part_split_evenly() -> None:
    f = _factors(r=6)
    w = leading_split(f, 3)
    assert w.rank == 3
    assert_product_close(w.delta(torch.float64), best_rank_p(f.delta(torch.float64), 3), rtol=1e-4)
    col = w.B.norm(dim=0)
    row = w.A.norm(dim=1)
    torch.testing.assert_close(col, row, rtol=1e-4, atol=1e-6)  # sqrt(S) on each side
    assert leading_split(f, 10).rank == 6  # never above the update's rank


def test_orthonormal_split_has_the_same_product_with_unit_rows_in_a() -> None:
    f = _factors(r=6)
    w, o = leading_split(f, 4), leading_split(f, 4, "orthonormal")
    assert_product_close(o.delta(torch.float64), w.delta(torch.float64), rtol=1e-4)
    torch.testing.assert_close(o.A @ o.A.mT, torch.eye(4), rtol=0, atol=1e-5)  # A = V^T
    S = torch.linalg.svdvals(f.delta(torch.float64))[:4].float()
    torch.testing.assert_close(o.B.norm(dim=0), S, rtol=1e-4, atol=1e-6)  # B = U S
    with pytest.raises(ConfigError, match="warm split must be"):
        leading_split(f, 4, "sideways")


def test_warm_correction_recovers_the_round_delta_and_aggregates_exactly() -> None:
    """A warm-started client's upload less its warm part is what it changed; FLoRA/FLoRIST of those
    corrected updates equal the dense sum_k p_k (s B'_k A'_k - warm_k)."""
    ups = make_updates([4, 2, 3])
    g = make_aggregator("florist").aggregate(make_updates([4, 4], seed=9)).global_update  # a global update
    deltas = [without_warm_part(u, warm_parts(g, max(f.rank for f in u.modules.values()))) for u in ups]
    for u, d in zip(ups, deltas, strict=True):
        for name, f in u.modules.items():
            w = leading_split(g[name], f.rank)
            want = f.delta(torch.float64) - w.delta(torch.float64)
            assert_product_close(d.modules[name].delta(torch.float64), want)
    result = make_aggregator("florist", policy=EnergyThreshold(1.0)).aggregate(deltas)
    for name in ups[0].modules:
        assert_product_close(
            result.global_update[name].delta(torch.float64), dense_reference(deltas, name), 1e-4
        )


def test_wire_rounding_matches_bf16_and_fp16_and_is_idempotent() -> None:
    f = _factors()
    for wire, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        r = to_wire(f, wire)
        assert r.A.dtype == torch.float32 and torch.equal(r.A, f.A.to(dt).float())
        assert torch.equal(to_wire(r, wire).B, r.B)
        rel = float((r.delta() - f.delta()).norm() / f.delta().norm())
        assert 0 < rel < (8e-3 if wire == "bfloat16" else 1e-3)
    assert torch.equal(to_wire(f, "float32").B, f.B)
    with pytest.raises(ConfigError, match="wire dtype must be one of"):
        to_wire(f, "int8")


def test_prepare_upload_and_result_to_wire() -> None:
    ups = make_updates([4, 2])
    modules, kept = prepare_upload(ups[0].modules, 0.8, "bfloat16")
    for name, f in modules.items():
        assert f.rank <= ups[0].modules[name].rank and 0.8 - 1e-6 <= kept[name] <= 1.0
        assert torch.equal(f.B, f.B.to(torch.bfloat16).float())
    same, kept = prepare_upload(ups[0].modules, None, "float32")
    assert same == dict(ups[0].modules) and set(kept.values()) == {1.0}
    result = make_aggregator("fedit").aggregate(ups)  # mixed ranks: per-client downloads
    sent = result_to_wire(result, "float16")
    assert sent.per_client is not None
    for cid, mods in sent.per_client.items():
        for name, f in mods.items():
            assert torch.equal(f.A, result.per_client[cid][name].A.half().float())  # type: ignore[index]
    assert result_to_wire(result, "float32") is result


def test_a_bf16_global_update_is_within_rounding_of_the_float32_one() -> None:
    """The 16-bit wire: uploads rounded, aggregation in float32, download rounded; the global update
    stays within bf16's relative rounding (2^-8) of the float32 path."""
    ups = make_updates([8, 4, 2, 4])
    rounded = [
        ClientUpdate(u.client_id, u.num_examples, prepare_upload(u.modules, None, "bfloat16")[0]) for u in ups
    ]
    agg = make_aggregator("flora")
    exact = agg.aggregate(ups).global_update
    wire = result_to_wire(agg.aggregate(rounded), "bfloat16").global_update
    for name in exact:
        ref = exact[name].delta(torch.float64)
        rel = float((wire[name].delta(torch.float64) - ref).norm() / ref.norm())
        assert rel < 2**-7, (name, rel)


def test_relative_error_is_one_definition_over_modules() -> None:
    from florist.lora.distance import relative_error

    want = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    got = {"a": torch.ones(2, 2) * 1.5, "b": torch.ones(3)}
    assert relative_error(got, want) == pytest.approx(((4 * 0.25 + 3) / 4) ** 0.5)
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0
    assert relative_error({"z": torch.zeros(2)}, {"z": torch.zeros(2)}) == 0.0


def test_energy_beyond_a_rank_reads_the_spectrum_of_the_product() -> None:
    from florist.aggregation.linalg import energy_beyond

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    R = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]  # any factorisation
    f = LoraFactors(A=(R.mT @ V.mT).float(), B=(U * s @ R).float())  # B @ A = U diag(s) V^T
    assert energy_beyond({"m": f}, 2) == pytest.approx((4 + 1) / 30, rel=1e-5)
    assert energy_beyond({"m": f, "n": f}, 0) == pytest.approx(1.0)
    assert energy_beyond({"m": f}, 4) == pytest.approx(0.0, abs=1e-9)
