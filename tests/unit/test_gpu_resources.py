"""Simulated clients get a share of the visible GPUs (``federation.gpus_per_client = "auto"``)."""

from __future__ import annotations

import logging

import pytest

from florist.config import load_config
from florist.errors import ConfigError
from florist.flower.simulation import backend_config


def _resources(*overrides: str, cores: int, gpus: int) -> dict:
    return backend_config(load_config(None, list(overrides)), cores=cores, gpus=gpus)


def test_auto_shares_the_gpus_between_the_clients_that_run_at_once() -> None:
    # 16 cores at 2 per client: 8 clients at once share 1 GPU (1/8 each) or 2 GPUs (1/4 each)
    one = _resources("federation.num_clients=8", cores=16, gpus=1)
    assert one["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.125}
    assert one["init_args"]["num_gpus"] == 1
    assert _resources("federation.num_clients=8", cores=16, gpus=2)["client_resources"]["num_gpus"] == 0.25
    # 4 clients on 8 GPUs: at most one GPU each; 4 cores at 2 per client: 2 at once share 1 GPU
    assert _resources("federation.num_clients=4", cores=64, gpus=8)["client_resources"]["num_gpus"] == 1.0
    assert _resources("federation.num_clients=8", cores=4, gpus=1)["client_resources"]["num_gpus"] == 0.5


def test_no_gpu_means_cpu_clients_and_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        res = _resources(cores=2, gpus=0)
    assert res["client_resources"]["num_gpus"] == 0.0 and "num_gpus" not in res["init_args"]
    assert not caplog.records


def test_zero_with_a_visible_gpu_warns_once_and_a_fraction_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        res = _resources("federation.gpus_per_client=0", cores=16, gpus=1)
    assert res["client_resources"]["num_gpus"] == 0.0
    assert [r.getMessage() for r in caplog.records if "train on the CPU" in r.getMessage()] and len(
        caplog.records
    ) == 1
    assert (
        _resources("federation.gpus_per_client=0.5", cores=16, gpus=1)["client_resources"]["num_gpus"] == 0.5
    )


@pytest.mark.parametrize("value", ["'some'", "-1", "'nan'"])
def test_bad_values_are_named(value: str) -> None:
    with pytest.raises(ConfigError, match="federation.gpus_per_client must be 'auto' or a number >= 0"):
        load_config(None, [f"federation.gpus_per_client={value}"])
