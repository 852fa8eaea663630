"""The fair grid's heterogeneous candidates: each method's homogeneous frontier, a configuration kept
unless another of the same method had both a lower validation loss and fewer bytes."""

from __future__ import annotations

import pytest

from florist.studies.fair import choose, chosen, frontier, setting_report
from tests.unit.test_fair_ladder import _variant


def test_a_configuration_is_dropped_only_when_one_of_its_method_beats_it_on_loss_and_bytes() -> None:
    per_seed = {0: {"homogeneous": {
        "FlexLoRA +bf16": _variant(0.02, -9.0, 0.0, 300),  # worse (on validation) and dearer: dropped
        "FlexLoRA +bf16 +uplink": _variant(0.01, 9.0, 0.0, 240),
        "FLoRA +bf16": _variant(0.05, 0.0, 0.0, 1300),  # worse but cheaper than +orth: kept
        "FLoRA +bf16 +orth": _variant(0.0, 0.0, 0.0, 2400),
        "FLoRA +bf16 +orth +acc": _variant(0.0, 0.0, 0.0, 2400),  # the same point as +orth: both kept
        "FedIT +bf16": _variant(0.5, 0.0, 0.0, 9000),  # the only FedIT: kept, whatever other methods do
        "FLoRIST tau=0.90 +all +orth": _variant(0.03, 0.0, 0.0, 100),
        "FLoRIST tau=0.90 +bf16 +orth": _variant(0.03, 0.0, 0.0, 200),  # equal loss, more bytes: dropped
        "FLoRIST tau=0.90 +bf16 +orth +acc": _variant(0.01, 0.0, 0.0, 241),
        "FLoRIST tau=0.90 +all +orth +ef": [{"round": 1, "bytes_up": 1, "bytes_down": 1}],  # unfinished
    }}}  # fmt: skip
    assert frontier(per_seed, "homogeneous", rounds=2) == [
        "FLoRA +bf16", "FLoRA +bf16 +orth", "FLoRA +bf16 +orth +acc",
        "FLoRIST tau=0.90 +all +orth", "FLoRIST tau=0.90 +bf16 +orth +acc",
        "FedIT +bf16", "FlexLoRA +bf16 +uplink",
    ]  # fmt: skip


def test_the_choice_is_the_first_seeds_and_later_seeds_do_not_re_decide_it() -> None:
    # seed 0 chooses +acc (validation 0.00 against 0.01); seeds 1 and 2 rerun only +acc and find it worse
    # (0.03), so over the seeds each finished +acc's mean (0.02) is above +all's seed-0 value (0.01): a
    # choice re-decided on those means would swap a three-seed configuration for a one-seed one
    acc, plain, base = "FLoRIST tau=0.90 +all +orth +acc", "FLoRIST tau=0.90 +all +orth", "FedIT +bf16"
    per_seed = {
        0: {"homogeneous": {acc: _variant(0.0, 0.0, 0.0, 100), plain: _variant(0.01, 0.0, 0.0, 100),
                            base: _variant(0.02, 0.0, 0.0, 300)}},
        1: {"homogeneous": {acc: _variant(0.03, 0.0, 0.0, 100), base: _variant(0.02, 0.0, 0.0, 300)}},
        2: {"homogeneous": {acc: _variant(0.03, 0.0, 0.0, 100), base: _variant(0.02, 0.0, 0.0, 300)}},
    }  # fmt: skip
    assert choose(per_seed, "homogeneous", rounds=2)[0]["FLoRIST"] == plain  # what the means alone would pick
    assert chosen(per_seed, "homogeneous", rounds=2) == {"FLoRIST": acc, "FedIT": base}
    report = setting_report(per_seed, "homogeneous", rounds=2)
    assert report["chosen"]["FLoRIST"] == acc
    row = next(r for r in report["rows"] if r["family"] == "FLoRIST")
    assert row["seeds"] == [0, 1, 2] and row["validation_loss"] == pytest.approx(report["validation"][acc])
    assert chosen({}, "homogeneous", rounds=2) == {}
