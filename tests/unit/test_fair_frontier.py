"""The fair grid's heterogeneous candidates: each method's homogeneous frontier, a configuration kept
unless another of the same method had both a lower validation loss and fewer bytes."""

from __future__ import annotations

from florist.studies.fair import frontier
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
