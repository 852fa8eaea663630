"""Every validation path raises an error whose message names the client, module and value."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from florist.aggregation import make_aggregator
from florist.errors import ConfigError, InvalidUpdate
from florist.lora import ClientUpdate, LoraFactors
from tests.helpers import make_updates

Q = "layers.0.q_proj"


def _with_module(u: ClientUpdate, name: str, f: LoraFactors | None) -> ClientUpdate:
    modules = dict(u.modules)
    if f is None:
        del modules[name]
    else:
        modules[name] = f
    return ClientUpdate(u.client_id, u.num_examples, modules)


def _poison(value: float) -> Callable[[list[ClientUpdate]], None]:
    def edit(us: list[ClientUpdate]) -> None:
        f = us[1].modules[Q]
        B = f.B.clone()
        B[0, 0] = value
        us[1] = _with_module(us[1], Q, LoraFactors(f.A, B, f.scaling))

    return edit


def _edit_factors(**changes: object) -> Callable[[list[ClientUpdate]], None]:
    def edit(us: list[ClientUpdate]) -> None:
        f = us[1].modules[Q]
        fields = {"A": f.A, "B": f.B, "scaling": f.scaling, **changes}
        us[1] = _with_module(us[1], Q, LoraFactors(**fields))  # type: ignore[arg-type]

    return edit


def _weight(value: object) -> Callable[[list[ClientUpdate]], None]:
    def edit(us: list[ClientUpdate]) -> None:
        us[1] = ClientUpdate(us[1].client_id, value, us[1].modules)  # type: ignore[arg-type]

    return edit


def _drop_module(us: list[ClientUpdate]) -> None:
    us[1] = _with_module(us[1], Q, None)


def _extra_module(us: list[ClientUpdate]) -> None:
    us[1] = _with_module(us[1], "layers.9.k_proj", us[1].modules[Q])


def _duplicate(us: list[ClientUpdate]) -> None:
    us.append(us[1])


CASES = [
    (
        _poison(math.nan),
        r"client 'client-1', module 'layers.0.q_proj': lora_B has 1 non-finite values \(1 NaN, 0 Inf\)",
    ),
    (
        _poison(math.inf),
        r"client 'client-1', module 'layers.0.q_proj': lora_B has 1 non-finite values \(0 NaN, 1 Inf\)",
    ),
    (
        _edit_factors(A=torch.randn(3, 16)),
        r"client 'client-1', module 'layers.0.q_proj': lora_B shape \(24, 4\) does not match lora_A shape \(3, 16\)",
    ),
    (
        _edit_factors(A=torch.randn(4, 17)),
        r"client 'client-1', module 'layers.0.q_proj': adapted weight shape \(24, 17\) differs from the other clients' \(24, 16\)",
    ),
    (
        _edit_factors(A=torch.randn(4)),
        r"client 'client-1', module 'layers.0.q_proj': lora_A and lora_B must be 2-D",
    ),
    (
        _edit_factors(scaling=math.nan),
        r"client 'client-1', module 'layers.0.q_proj': scaling must be finite, got nan",
    ),
    (
        _edit_factors(A=torch.ones(4, 16, dtype=torch.int64)),
        r"lora_A must be a floating-point tensor, got dtype torch.int64",
    ),
    (_weight(0), r"client 'client-1': num_examples must be a positive finite number, got 0"),
    (_weight(-3.0), r"client 'client-1': num_examples must be a positive finite number, got -3.0"),
    (_weight(math.inf), r"client 'client-1': num_examples must be a positive finite number, got inf"),
    (_weight(math.nan), r"client 'client-1': num_examples must be a positive finite number, got nan"),
    (
        _drop_module,
        r"client 'client-1': module set differs from the other clients': missing \['layers.0.q_proj'\], extra \[\]",
    ),
    (
        _extra_module,
        r"client 'client-1': module set differs from the other clients': missing \[\], extra \['layers.9.k_proj'\]",
    ),
    (_duplicate, r"client 'client-1': duplicate client id: it appears 2 times"),
]


@pytest.mark.parametrize(("edit", "message"), CASES)
@pytest.mark.parametrize("method", ["florist", "flora", "fedit", "flexlora"])
def test_bad_update_is_named(method: str, edit: Callable[[list[ClientUpdate]], None], message: str) -> None:
    updates = make_updates([4, 4, 4])
    edit(updates)
    with pytest.raises(InvalidUpdate, match=message):
        make_aggregator(method).aggregate(updates)


def test_round_is_named_when_given() -> None:
    updates = make_updates([4, 4])
    _poison(math.nan)(updates)
    with pytest.raises(InvalidUpdate, match=r"client 'client-1', round 7, module 'layers.0.q_proj'") as info:
        make_aggregator("florist").aggregate(updates, round=7)
    assert (info.value.client, info.value.round, info.value.module) == ("client-1", 7, Q)


def test_empty_client_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no client updates to aggregate: the client list is empty"):
        make_aggregator("florist").aggregate([])


def test_client_with_no_modules_is_named() -> None:
    updates = make_updates([4, 4])
    updates[0] = ClientUpdate(updates[0].client_id, 5.0, {})
    with pytest.raises(InvalidUpdate, match="client 'client-0': the update has no adapted modules"):
        make_aggregator("flora").aggregate(updates)


def test_float16_compute_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="compute dtype must be float32 or float64, got torch.float16"):
        make_aggregator("florist", dtype=torch.float16).aggregate(make_updates([2, 2]))


@pytest.mark.parametrize("method", ["florist", "fedit"])
def test_the_client_that_differs_from_the_majority_is_blamed_not_the_first(method: str) -> None:
    updates = make_updates([4, 4, 4])
    f = updates[0].modules[Q]
    updates[0] = _with_module(updates[0], Q, LoraFactors(torch.randn(4, 17), f.B, f.scaling))
    with pytest.raises(
        InvalidUpdate, match=r"client 'client-0', module 'layers.0.q_proj': adapted weight shape \(24, 17\)"
    ):
        make_aggregator(method).aggregate(updates)
    updates = make_updates([4, 4, 4])
    updates[0] = _with_module(updates[0], Q, None)
    with pytest.raises(InvalidUpdate, match=r"client 'client-0': module set differs"):
        make_aggregator(method).aggregate(updates)


def test_huge_example_counts_are_weighted_without_overflow() -> None:
    from florist.lora.validation import client_weights

    updates = [ClientUpdate(u.client_id, 1e308, u.modules) for u in make_updates([4, 4])]
    assert client_weights(updates).tolist() == [0.5, 0.5]
