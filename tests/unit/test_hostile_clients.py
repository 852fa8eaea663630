"""A registered client that sends anything: forged hello replies, ids, metrics, dtypes, shapes, sizes.

Each case drives the real codec and strategy with fabricated messages (no network) and checks that
the server stays up, leaves the offender out with a reason, keeps the honest clients' aggregate, and
writes nothing outside its run directory.
"""

from __future__ import annotations

import logging
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict

from florist.config import load_config
from florist.errors import ConfigError
from florist.flower.codec import encode_upload
from florist.flower.federation import sync_digest
from florist.flower.handshake import client_info, hello
from florist.fsutil import safe_name
from florist.lora import ClientUpdate, LoraFactors
from florist.server.rundir import RunDir
from tests.unit.test_strategy_reliability import (
    RANK,
    ROUND,
    N,
    _meta,
    assert_close_products,
    dense,
    honest,
    products,
    reply,
    strategy,
)


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, int]]:
    from florist.server.global_model import adapted_shapes
    from tests.peft_helpers import tiny_llama

    return adapted_shapes(tiny_llama(0), ("q_proj", "v_proj"))


def _cfg(n: int = 3) -> Any:
    return load_config(None, [f"federation.num_clients={n}", f"lora.ranks=[{RANK}]", "federation.timeout=5"])


# ------------------------------------------------------------------ 1. ids and paths


@pytest.mark.parametrize("claimed", ["../../../../x", "/abs/path", "client-000", ""])
def test_the_server_names_the_client_whatever_it_claims(claimed: str) -> None:
    info = client_info(7, {"client_id": claimed, "index": 2, "rank": RANK, "num_examples": 40}, _cfg())
    assert info.client_id == "client-002" and info.index == 2 and info.node_id == 7


@pytest.mark.parametrize("name", ["../x", "/abs", "", ".hidden", "a/b", "x" * 200, "a\x00b"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="not a safe file name"):
        safe_name(name, "client id")


def test_a_run_name_cannot_leave_run_dir(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.dir={str(tmp_path)!r}", "run.name='../escape'"])
    with pytest.raises(ConfigError, match="run.name '../escape' is not a safe file name"):
        RunDir(cfg, "base")
    assert not (tmp_path.parent / "escape").exists()


# ------------------------------------------------------------------ 5. hello


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outgoing messages need a run id, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    def __init__(self, replies: dict[int, dict[str, Any]]) -> None:
        self.replies = replies

    def get_node_ids(self) -> list[int]:
        return sorted(self.replies)

    def send_and_receive(self, msgs: list[Message], timeout: float) -> list[Message]:
        return [Message(content=RecordDict({"client": ConfigRecord(c)}), metadata=_meta(node))
                for node, c in self.replies.items()]  # fmt: skip


def _hello(index: Any, rank: Any = RANK, n: Any = 40) -> dict[str, Any]:
    return {"client_id": "whatever", "index": index, "rank": rank, "num_examples": n, "held": []}


def test_a_second_claim_of_a_taken_index_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    grid = FakeGrid({11: _hello(0), 12: _hello(1), 13: _hello(1), 14: _hello(2)})
    infos = hello(grid, _cfg(3))  # type: ignore[arg-type]
    assert [(i.node_id, i.client_id) for i in infos] == [
        (11, "client-000"),
        (12, "client-001"),
        (14, "client-002"),
    ]
    assert "node 13 refused: client index 1 is taken by node 12" in caplog.text


@pytest.mark.parametrize(
    ("claim", "why"),
    [
        (_hello(5), "client index 5 is outside 0..2"),
        (_hello(2, rank=64), "declares rank 64; the config gives it 8"),
        (_hello(2, n=0), "declares 0 examples"),
        (_hello(2, n=10**12), "declares 1000000000000 examples"),
        (_hello("2"), "index must be an integer"),
        (_hello(2, n=[1, 2]), "num_examples must be an integer"),
        ({**_hello(2), "held": [float("inf")]}, "held rounds must be integers in 1..3, got inf"),
        ({**_hello(2), "held": list(range(1, 10**4))}, "held must be a list of at most 3 rounds"),
        ({**_hello(2), "held": "1,2"}, "held must be a list"),
    ],
)
def test_bad_hello_claims_refuse_the_node(
    claim: dict[str, Any], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    grid = FakeGrid({11: _hello(0), 12: _hello(1), 13: claim})
    with pytest.raises(RuntimeError, match=r"no node serves client indices \[2\]"):
        hello(grid, _cfg(3))  # type: ignore[arg-type]
    assert why in caplog.text


# ------------------------------------------------------------------ 2. forged replies


def _corrupt_metrics(msg: Message) -> Message:
    msg.content["metrics"] = MetricRecord({"num-examples": 30.0, "train_loss": [1.0, 2.0]})
    return msg


def _unknown_dtype(msg: Message) -> Message:
    arrays = msg.content["lora"]
    key = next(iter(arrays.keys()))
    arrays[key] = Array(dtype="no-such-dtype", shape=(3,), stype=arrays[key].stype, data=arrays[key].data)
    return msg


def _lying_shape(msg: Message) -> Message:
    arrays = msg.content["lora"]
    key = next(iter(arrays.keys()))
    arrays[key] = Array(dtype="float32", shape=(1,), stype=arrays[key].stype, data=arrays[key].data)
    return msg


def _huge_shape(msg: Message) -> Message:
    arrays = msg.content["lora"]
    key = next(iter(arrays.keys()))
    arrays[key] = Array(dtype="float32", shape=(2**32, 2**32), stype=arrays[key].stype, data=arrays[key].data)
    return msg


def _no_meta(msg: Message) -> Message:
    del msg.content["lora_meta"]
    return msg


FORGED = {
    "list-valued metric": (_corrupt_metrics, "metric 'train_loss' must be a finite number"),
    "unknown dtype": (_unknown_dtype, "no-such-dtype"),
    "shape claims 1 element": (_lying_shape, "claims shape (1,)"),
    "shape claims 2^64 elements": (_huge_shape, "above federation.max_message_mb"),
    "no lora_meta": (_no_meta, "unreadable reply"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_reply_leaves_its_client_out_and_the_round_goes_on(
    case: str, shapes: dict[str, tuple[int, int]]
) -> None:
    forge, reason = FORGED[case]
    s = strategy(shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    replies = [reply(u) for u in ups[:2]] + [forge(reply(ups[2]))] + [reply(u) for u in ups[3:]]
    arrays, _ = s.aggregate_train(ROUND, replies)  # must not raise
    assert arrays is not None
    assert reason in s.logs[ROUND].rejected["client-002"]
    assert_close_products(products(s), dense([u for u in ups if u.client_id != "client-002"]))


def test_a_sync_reply_without_a_usable_digest_is_ignored() -> None:
    ok = "ab" * 32
    for content, want in (
        ({"client": ConfigRecord({"digest": ok})}, ok),
        ({"client": ConfigRecord({"digest": "../x"})}, None),
        ({"client": ConfigRecord({})}, None),
        ({}, None),
    ):
        assert sync_digest(Message(content=RecordDict(content), metadata=_meta(1))) == want


# ------------------------------------------------------------------ 3. finite inputs, infinite update


def _scaled(u: ClientUpdate, scaling: float) -> ClientUpdate:
    return replace(u, modules={n: replace(f, scaling=scaling) for n, f in u.modules.items()})


@pytest.mark.parametrize("method", ["florist", "fedit"])
@pytest.mark.parametrize("scaling", [1e300, 1e39, 1e29])
def test_a_huge_scaling_is_refused_and_the_global_stays_finite(
    method: str, scaling: float, shapes: dict[str, tuple[int, int]]
) -> None:
    from florist.flower.strategy import FederatedLoRA
    from tests.unit.test_strategy_reliability import clients

    cfg = load_config(
        None, [f"federation.num_clients={N}", f"lora.ranks=[{RANK}]", f"aggregation.method={method!r}"]
    )
    agg = cfg.aggregator()
    s = FederatedLoRA(cfg, agg, clients(), shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    replies = [reply(u) for u in ups[:2]] + [reply(_scaled(ups[2], scaling))] + [reply(u) for u in ups[3:]]
    s.aggregate_train(ROUND, replies)
    assert "out of range" in s.logs[ROUND].rejected["client-002"]
    _, result = s.server.history[-1]
    assert all(
        bool(torch.isfinite(f.B).all() and torch.isfinite(f.A).all()) for f in result.global_update.values()
    )


def test_a_non_finite_aggregate_drops_its_culprit_not_the_round(
    shapes: dict[str, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = strategy(shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    big = replace(ups[4], modules={n: replace(f, B=f.B * 1e2) for n, f in ups[4].modules.items()})
    cls = type(s.aggregator)
    real = cls.aggregate

    def poisoned(self: Any, updates: list[ClientUpdate], *, round: int | None = None) -> Any:
        result = real(self, updates, round=round)
        if any(u.client_id == "client-004" for u in updates):  # e.g. an overflow inside the SVD
            name = next(iter(result.global_update))
            f = result.global_update[name]
            result.global_update[name] = LoraFactors(A=f.A, B=f.B * float("inf"))
        return result

    monkeypatch.setattr(cls, "aggregate", poisoned)
    s.aggregate_train(ROUND, [reply(u) for u in ups[:4]] + [reply(big)])
    assert s.logs[ROUND].skipped is None
    assert (
        "not finite (as rounded to the wire dtype); without it the round aggregates"
        in s.logs[ROUND].rejected["client-004"]
    )
    assert_close_products(products(s), dense(ups[:4]))


# ------------------------------------------------------------------ 4. nothing allocated from a claim


def test_ffa_claimed_width_is_checked_before_anything_is_allocated(
    shapes: dict[str, tuple[int, int]],
) -> None:
    from florist.aggregation import make_aggregator
    from florist.flower.strategy import FederatedLoRA
    from tests.unit.test_strategy_reliability import clients

    cfg = load_config(
        None, [f"federation.num_clients={N}", f"lora.ranks=[{RANK}]", "aggregation.method='ffa'"]
    )
    s = FederatedLoRA(cfg, make_aggregator("ffa"), clients(), shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    forged = reply(ups[2])
    arrays, meta = encode_upload(ups[2].modules, with_a=False)
    meta = ConfigRecord({**dict(meta), **{k: 10**8 for k in meta if k.startswith("n.")}})
    forged.content["lora"], forged.content["lora_meta"] = arrays, meta
    tracemalloc.start()
    s.aggregate_train(ROUND, [forged])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "does not fit the model's weight" in s.logs[ROUND].rejected["client-002"]
    assert peak < 50e6  # a (rank, 1e8) float32 draw would be 3.2 GB
