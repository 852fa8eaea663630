"""The bench report on fabricated results: paired differences, total bytes, the goal, the picks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from florist.errors import ConfigError
from florist.studies import report
from florist.studies.headline import BenchOptions
from florist.studies.variants import florist, sweep

ROWS = 6


def record(losses: list[float], up: int, down: int, rank: int = 10) -> list[dict[str, Any]]:
    tokens = [2, 3, 1, 4, 2, 3]
    ev = {
        "heldout_loss": sum(x * n for x, n in zip(losses, tokens, strict=True)) / sum(tokens),
        "perplexity": 1.0,
        "heldout_rows": losses,
        "heldout_tokens": tokens,
    }
    r1 = {
        "round": 1,
        "bytes_up": up,
        "bytes_down": down,
        "round_error": 0.1,
        "rank_total": rank,
        "efficiency_e-4": 1.0,
    }
    return [r1, r1 | {"round": 2, "round_error": 0.3, "eval": ev}]


def results() -> dict[str, list[dict[str, Any]]]:
    flora = [2.0, 2.1, 1.9, 2.2, 2.0, 2.05]
    base = [x + 0.2 for x in flora]
    ev = report.loss_of(record(base, 0, 0)[-1]["eval"])
    assert ev is not None
    return {
        report.BASE: [{"round": 0, "eval": record(base, 0, 0)[-1]["eval"]}],
        "FLoRA": record(flora, 100, 800, rank=80),
        "FedIT": record([x + 0.004 for x in flora], 100, 100),
        "FLoRIST tau=0.90": record([x + 0.003 for x in flora], 100, 40),
        "FLoRIST tau=0.90 +all": record([x + 0.004 for x in flora], 30, 20),
        "FLoRIST tau=0.80": record([x + 0.02 for x in flora], 100, 20),
    }


def test_rows_pair_against_flora_and_count_total_bytes() -> None:
    rows = {r["method"]: r for r in report.table_rows(results())}
    assert rows["FLoRA"]["paired"]["mean"] == 0.0
    assert rows["FLoRIST tau=0.90"]["paired"]["mean"] == pytest.approx(0.003)
    assert rows["FLoRIST tau=0.90"]["paired"]["low"] == pytest.approx(0.003)  # a constant shift: no spread
    assert rows["FLoRA"]["total_bytes"] == 1800 and rows["FLoRA"]["vs_flora"] == 1.0
    assert rows["FLoRIST tau=0.90 +all"]["vs_flora"] == pytest.approx(100 / 1800)
    assert rows["FLoRIST tau=0.90 +all"]["vs_fedit"] == pytest.approx(100 / 400)
    assert rows["FedIT"]["round_error"] == pytest.approx(0.2)  # the mean over rounds
    assert rows[report.BASE]["total_bytes"] == 0 and rows[report.BASE]["paired"]["mean"] == pytest.approx(0.2)


def test_goal_and_picks() -> None:
    rows = report.table_rows(results())
    # +all: +0.004 <= 0.005 nats, 100 B <= 1800 B / 10 and < FedIT's 400 B; tau 0.90 alone: 280 B > 180 B
    assert report.goal(rows) == ["FLoRIST tau=0.90 +all"]
    assert report.goal(rows, tolerance=0.0035) == []
    assert report.goal(rows, factor=6) == ["FLoRIST tau=0.90", "FLoRIST tau=0.90 +all"]
    picks = report.pick_o_e(rows, tolerance=0.02)
    assert picks == {"O": "FLoRIST tau=0.90", "E": "FLoRIST tau=0.80"}  # options are not tau picks


def test_write_all_writes_tables_and_plots(tmp_path: Path) -> None:
    text, picks = report.write_all(tmp_path, {"homogeneous": results()}, 0.005)
    assert "| FLoRIST tau=0.90 +all | " in text and "+0.0040 [+0.0040, +0.0040]" in text
    assert "met by FLoRIST tau=0.90 +all." in text
    assert picks["homogeneous"]["goal_met_by"] == ["FLoRIST tau=0.90 +all"]
    assert (tmp_path / "bytes_loss_homogeneous.png").stat().st_size > 10_000


def test_layer_order_is_numeric() -> None:
    names = [f"model.layers.{i}.self_attn.q_proj" for i in (10, 2, 0, 22, 9)]
    assert [n.split(".")[2] for n in report.layer_sorted(names)] == ["0", "2", "9", "10", "22"]


def test_variant_names_and_options() -> None:
    v = florist(0.9, ["all"])
    assert v.name == "FLoRIST tau=0.90 +all"
    assert v.overrides()["federation.uplink_tau"] == 0.9 and v.overrides()["lora.warm_start"] is True
    assert v.overrides()["federation.wire_dtype"] == "bfloat16"
    names = [x.name for x in sweep(taus=(0.9,), option_taus=(0.9,), options=("warm", "uplink"))]
    assert names == ["FedIT", "FLoRA", "FlexLoRA", "FFA-LoRA", "RB-LoRA", "FedEx-LoRA", "FedSVD", "FedAvg (full weights)", "FLoRIST tau=0.90", "FLoRIST tau=0.90 +warm",
                     "FLoRIST tau=0.90 +uplink"]  # fmt: skip


def test_option_combinations_and_unknown_options() -> None:
    v = florist(0.9, ["all+orth"])
    assert v.name == "FLoRIST tau=0.90 +all +orth"
    o = v.overrides()
    assert o["lora.warm_split"] == "orthonormal" and o["lora.warm_start"] is True
    assert o["federation.uplink_tau"] == 0.9 and o["federation.wire_dtype"] == "bfloat16"
    assert florist(0.9, ["all"]).overrides()["lora.warm_split"] == "balanced"  # the committed rows' split
    acc = florist(0.9, ["all+acc"]).overrides()
    assert acc["lora.warm_from"] == "accumulated" and acc["lora.warm_start"] is True
    assert "lora.warm_from" not in florist(0.9, ["all"]).overrides()
    with pytest.raises(ConfigError, match=r"unknown FLoRIST option\(s\) \['fast'\]"):
        florist(0.9, ["warm+fast"])
    with pytest.raises(ConfigError, match="unknown FLoRIST option"):
        BenchOptions(options=("all+turbo",))


def test_the_goal_is_not_called_missed_when_its_references_did_not_run() -> None:
    from florist.studies.report import goal_verdict

    assert goal_verdict([], {"FLoRA": [], "FLoRIST tau=0.90": []}) == "cannot be judged: FedIT not run"
    assert goal_verdict([], {"FLoRA": [], "FedIT": []}) == "not met"
    assert (
        goal_verdict(["FLoRIST tau=0.90 +all"], {"FLoRA": [], "FedIT": []}) == "met by FLoRIST tau=0.90 +all"
    )
