"""The strategy on fabricated replies (no network): bad updates, duplicates, quorum, robust clipping.

Shapes are those of the tiny random Llama's q_proj and v_proj. Every check compares the global
update's products with a dense reference over the clients that should have been kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from florist.client.local import client_id
from florist.config import FloristConfig, load_config
from florist.flower.codec import encode_upload
from florist.flower.replies import ClientInfo
from florist.flower.strategy import FederatedLoRA
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.distance import relative_error
from florist.server.global_model import adapted_shapes
from tests.peft_helpers import tiny_llama

N, HALF, ROUND = 5, 4, 1
RANK = 2 * HALF  # each client: its own HALF directions and HALF shared ones


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, int]]:
    return adapted_shapes(tiny_llama(0), ("q_proj", "v_proj"))


def config(*overrides: str, n: int = N) -> FloristConfig:
    base = [f"federation.num_clients={n}", f"lora.ranks=[{RANK}]", "aggregation.tau=1.0"]
    return load_config(None, [*base, *overrides])


def clients(n: int = N) -> list[ClientInfo]:
    return [ClientInfo(100 + k, client_id(k), k, RANK, 10 * (k + 1)) for k in range(n)]


def strategy(shapes: dict[str, tuple[int, int]], *overrides: str, n: int = N) -> FederatedLoRA:
    cfg = config(*overrides, n=n)
    agg = cfg.aggregator()
    return FederatedLoRA(cfg, agg, clients(n), shapes)


def honest(shapes: dict[str, tuple[int, int]], k: int, common: float = 0.0) -> ClientUpdate:
    """A client's update: its own random part plus ``common`` times a part all clients share."""
    own, shared = torch.Generator().manual_seed(k), torch.Generator().manual_seed(999)
    modules = {}
    for name, (m, n) in sorted(shapes.items()):
        A = torch.randn(HALF, n, generator=own)
        B = 0.1 * torch.randn(m, HALF, generator=own)
        A0, B0 = torch.randn(HALF, n, generator=shared), 0.1 * torch.randn(m, HALF, generator=shared)
        modules[name] = LoraFactors(A=torch.cat([A, A0]), B=torch.cat([B, common * B0], dim=1), scaling=0.5)
    return ClientUpdate(client_id(k), 10.0 * (k + 1), modules)


def reply(
    update: ClientUpdate, node: int | None = None, n: float | None = None, merged: tuple[int, ...] = ()
) -> Message:
    arrays, meta = encode_upload(update.modules)
    content = RecordDict(
        {
            "lora": arrays,
            "lora_meta": meta,
            "metrics": MetricRecord(
                {"num-examples": update.num_examples if n is None else n, "train_loss": 1.0}
            ),
            "client": ConfigRecord({"client_id": update.client_id, "merged": list(merged)}),
        }
    )
    return Message(
        content=content, metadata=_meta(node if node is not None else 100 + int(update.client_id[-3:]))
    )


def _meta(node: int) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"reply-{node}-{time.monotonic_ns()}", src_node_id=node, dst_node_id=0,
        reply_to_message_id=f"ins-{node}", group_id="", created_at=time.time(), ttl=3600.0, message_type="train",
    )  # fmt: skip


def dense(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """sum_k p_k scaling_k B_k A_k over ``updates``, p renormalised over them."""
    total = sum(u.num_examples for u in updates)
    return {
        name: sum((u.num_examples / total) * u.modules[name].delta(torch.float64) for u in updates)  # type: ignore[misc]
        for name in updates[0].modules
    }


def products(s: FederatedLoRA) -> dict[str, torch.Tensor]:
    _, result = s.server.history[-1]
    return {name: f.delta(torch.float64) for name, f in result.global_update.items()}


def assert_close_products(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ bad updates


def _nan(u: ClientUpdate, name: str) -> ClientUpdate:
    f = u.modules[name]
    A = f.A.clone()
    A[0, 0] = float("nan")
    return replace(u, modules={**u.modules, name: replace(f, A=A)})


def _inf(u: ClientUpdate, name: str) -> ClientUpdate:
    f = u.modules[name]
    B = f.B.clone()
    B[1, 1] = float("inf")
    return replace(u, modules={**u.modules, name: replace(f, B=B)})


def _shape(u: ClientUpdate, name: str) -> ClientUpdate:
    f = u.modules[name]
    return replace(u, modules={**u.modules, name: replace(f, B=torch.cat([f.B, f.B[:1]]))})


def _missing(u: ClientUpdate, name: str) -> ClientUpdate:
    return replace(u, modules={k: v for k, v in u.modules.items() if k != name})


def _extra(u: ClientUpdate, name: str) -> ClientUpdate:
    return replace(u, modules={**u.modules, "model.layers.0.mlp.up_proj": u.modules[name]})


def _rank(u: ClientUpdate, name: str) -> ClientUpdate:
    f = u.modules[name]
    A, B = torch.cat([f.A, f.A[:4]]), torch.cat([f.B, f.B[:, :4]], dim=1)  # rank 12 > 8
    return replace(u, modules={**u.modules, name: replace(f, A=A, B=B)})


BAD: dict[str, tuple[Callable[[ClientUpdate, str], ClientUpdate], float | None, str]] = {
    "nan": (_nan, None, "non-finite values (1 NaN"),
    "inf": (_inf, None, "(0 NaN, 1 Inf)"),
    "wrong shape": (_shape, None, "claims shape (17, 8); the model takes (16, r)"),
    "missing module": (_missing, None, "missing ['model.layers.1.self_attn.v_proj']"),
    "extra module": (_extra, None, "unexpected array 'model.layers.0.mlp.up_proj.lora_"),
    "rank above maximum": (_rank, None, "claims shape (12, 32); the model takes (r, 32) with 1 <= r <= 8"),
    "inflated examples": (lambda u, _: u, 1e9, "exceeds the 30 it declared"),
    "non-finite examples": (lambda u, _: u, float("inf"), "num_examples must be a positive finite number"),
    "zero examples": (lambda u, _: u, 0.0, "num_examples must be a positive finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_update_leaves_its_client_out_and_the_round_goes_on(
    case: str, shapes: dict[str, tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, n, reason = BAD[case]
    s = strategy(shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    module = "model.layers.1.self_attn.v_proj"
    replies = (
        [reply(u) for u in ups[:2]] + [reply(corrupt(ups[2], module), n=n)] + [reply(u) for u in ups[3:]]
    )
    caplog.set_level(logging.WARNING)
    arrays, _ = s.aggregate_train(ROUND, replies)  # must not raise
    assert arrays is not None
    _, result = s.server.history[-1]
    assert result.client_ids == tuple(u.client_id for u in ups if u.client_id != "client-002")
    why = s.logs[ROUND].rejected["client-002"]
    assert reason in why and "client 'client-002'" in why and "round 1" in why
    if case not in (
        "inflated examples",
        "non-finite examples",
        "zero examples",
        "missing module",
        "extra module",
    ):
        assert module in why
    assert "client-002 left out" in caplog.text
    assert_close_products(products(s), dense([u for u in ups if u.client_id != "client-002"]))


def test_duplicate_error_foreign_and_impostor_replies_are_discarded(
    shapes: dict[str, tuple[int, int]],
) -> None:
    s = strategy(shapes)
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    twice = reply(ups[1])
    error = Message(error=Error(0, "Exception: CUDA out of memory"), metadata=_meta(103))
    foreign = reply(ups[0], node=777)  # a node that never joined
    impostor = reply(ups[0], node=104)  # node of client-004 claims to be client-000
    replies = [reply(ups[0]), twice, reply(ups[1]), reply(ups[2]), error, foreign, impostor]
    s.aggregate_train(ROUND, replies)
    _, result = s.server.history[-1]
    assert result.client_ids == ("client-000", "client-001", "client-002")
    rejected = s.logs[ROUND].rejected
    assert "duplicate reply" in rejected["client-001"]
    assert "CUDA out of memory" in rejected["client-003"]
    assert "not sampled" in rejected["node 777"]
    assert "claims client id 'client-000'" in rejected["client-004"]
    assert_close_products(products(s), dense(ups[:3]))


def test_garbage_reply_is_left_out(shapes: dict[str, tuple[int, int]]) -> None:
    s = strategy(shapes)
    ups = [honest(shapes, k) for k in range(2)]
    bad = reply(ups[1])
    bad.content["lora"] = ArrayRecord(
        {"not-a-lora-key": bad.content["lora"]["model.layers.0.self_attn.q_proj.lora_A"]}
    )
    s.aggregate_train(ROUND, [reply(ups[0]), bad])
    assert "unexpected array 'not-a-lora-key'" in s.logs[ROUND].rejected["client-001"]
    assert s.server.history[-1][1].client_ids == ("client-000",)


# ------------------------------------------------------------------ quorum


def test_too_few_usable_updates_skip_the_round(shapes: dict[str, tuple[int, int]]) -> None:
    s = strategy(shapes, "federation.min_replies=3")
    ups = [honest(shapes, k) for k in range(N)]
    s.aggregate_train(1, [reply(u) for u in ups])
    before = products(s)
    nan = _nan(ups[1], "model.layers.0.self_attn.q_proj")
    arrays, metrics = s.aggregate_train(2, [reply(ups[0], merged=(1,)), reply(nan, merged=(1,))])
    assert arrays is None and metrics is not None and metrics["skipped"] == 1
    assert [t for t, _ in s.server.history] == [1]  # global model unchanged
    assert all(torch.equal(products(s)[k], before[k]) for k in before)
    skipped = s.logs[2].skipped
    assert skipped is not None and "1 usable update(s), 3 required" in skipped and "client-001" in skipped


def test_renormalised_weights_over_survivors(shapes: dict[str, tuple[int, int]]) -> None:
    s = strategy(shapes)
    ups = [honest(shapes, k) for k in range(N)]
    survivors = [ups[0], ups[3], ups[4]]
    s.aggregate_train(ROUND, [reply(u) for u in survivors])
    _, result = s.server.history[-1]
    total = sum(u.num_examples for u in survivors)
    assert result.weights == pytest.approx({u.client_id: u.num_examples / total for u in survivors})
    assert_close_products(products(s), dense(survivors))


# ------------------------------------------------------------------ robust mode


relative_deviation = relative_error  # florist.lora.distance


def run_round(s: FederatedLoRA, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    s.aggregate_train(ROUND, [reply(u) for u in updates])
    return products(s)


@pytest.mark.parametrize("clip", ["median", "fixed"])
def test_clipping_bounds_a_scaled_client(clip: str, shapes: dict[str, tuple[int, int]]) -> None:
    """The attack's effect on 8 clients (the paper's federation): the same server, client 2 honest vs
    x 3e3 (its factors stay inside the factor bound, so only clipping stands between it and the global)."""
    from florist.aggregation.robust import update_norm

    ups = [honest(shapes, k, common=3.0) for k in range(8)]
    attacked = [
        *ups[:2],
        replace(ups[2], modules={n: replace(f, B=f.B * 3e3) for n, f in ups[2].modules.items()}),
        *ups[3:],
    ]
    value = "1.0" if clip == "median" else f"{1.5 * max(update_norm(u) for u in ups)}"
    on = [f"aggregation.clip={clip!r}", f"aggregation.clip_value={value}"]
    dev_on = relative_deviation(
        run_round(strategy(shapes, *on, n=8), attacked), run_round(strategy(shapes, *on, n=8), ups)
    )
    dev_off = relative_deviation(
        run_round(strategy(shapes, n=8), attacked), run_round(strategy(shapes, n=8), ups)
    )
    assert dev_on <= 0.10, dev_on
    assert dev_off > 100, dev_off
    s = strategy(shapes, *on, n=8)
    s.aggregate_train(ROUND, [reply(u) for u in attacked])
    clip_log = s.logs[ROUND].clip
    assert clip_log is not None and clip_log["factors"]["client-002"] < 1e-3
    assert clip_log["norms"]["client-002"] == pytest.approx(3e3 * update_norm(ups[2]), rel=1e-6)


def test_an_oversize_reply_is_left_out(shapes: dict[str, tuple[int, int]]) -> None:
    ups = [honest(shapes, k) for k in range(2)]
    big = replace(ups[1], modules={n: replace(f, A=torch.cat([f.A] * 8), B=torch.cat([f.B] * 8, dim=1))
                                   for n, f in ups[1].modules.items()})  # fmt: skip
    limit = 1.5 * sum(RANK * (m + n) * 4 for m, n in shapes.values()) / 1e6  # MB: room for rank 8, not 64
    s = strategy(shapes, f"federation.max_message_mb={limit}")
    s.aggregate_train(ROUND, [reply(ups[0]), reply(big)])
    assert "round 1: the reply would be" in s.logs[ROUND].rejected["client-001"]
    assert "above federation.max_message_mb" in s.logs[ROUND].rejected["client-001"]
    assert s.server.history[-1][1].client_ids == ("client-000",)


# ------------------------------------------------------------------ protocol options on the server


def wire_reply(update: ClientUpdate, wire: str) -> Message:
    msg = reply(update)
    msg.content["lora"] = encode_upload(update.modules, wire=wire)[0]
    return msg


def test_bf16_uploads_are_decoded_counted_at_two_bytes_and_the_global_is_sent_rounded(
    shapes: dict[str, tuple[int, int]],
) -> None:
    from florist.aggregation.lowrank import prepare_upload

    s = strategy(shapes, "federation.wire_dtype='bfloat16'")
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    s.aggregate_train(ROUND, [wire_reply(u, "bfloat16") for u in ups])
    elements = sum(f.A.numel() + f.B.numel() for u in ups for f in u.modules.values())
    assert s.logs[ROUND].bytes_up == 2 * elements
    rounded = [replace(u, modules=prepare_upload(u.modules, None, "bfloat16")[0]) for u in ups]
    got, want = products(s), dense(rounded)
    for name in want:  # aggregated in float32 from the rounded uploads, then the download rounded
        assert float((got[name] - want[name]).norm() / want[name].norm()) < 2**-7
    _, result = s.server.history[-1]
    for f in result.global_update.values():  # what the server keeps is exactly what it sends
        assert torch.equal(f.B, f.B.to(torch.bfloat16).float()) and torch.equal(f.A, f.A.bfloat16().float())
    arr = next(iter(s.outgoing(100)[ROUND].values()))
    assert arr.dtype == "bfloat16"


def test_a_reply_whose_arrays_lie_about_their_dtype_is_left_out(shapes: dict[str, tuple[int, int]]) -> None:
    from flwr.app import Array

    s = strategy(shapes, "federation.wire_dtype='bfloat16'")
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    bad = wire_reply(ups[1], "bfloat16")
    arrays = bad.content["lora"]
    key = next(iter(arrays.keys()))
    real = reply(ups[1]).content["lora"][key]  # float32 bits under a bfloat16 label
    arrays[key] = Array(dtype="bfloat16", shape=real.shape, stype=real.stype, data=real.data)
    s.aggregate_train(
        ROUND, [wire_reply(ups[0], "bfloat16"), bad, *[wire_reply(u, "bfloat16") for u in ups[2:]]]
    )
    assert "client-001" in s.logs[ROUND].rejected
    assert "bfloat16 array must carry uint16" in s.logs[ROUND].rejected["client-001"]


def test_an_upload_in_another_dtype_than_the_wire_is_left_out(shapes: dict[str, tuple[int, int]]) -> None:
    """A float32 upload on a bf16 wire (twice the bytes the run allows) is refused on its metadata."""
    s = strategy(shapes, "federation.wire_dtype='bfloat16'")
    ups = [honest(shapes, k, common=1.0) for k in range(N)]
    s.aggregate_train(ROUND, [reply(ups[0]), *[wire_reply(u, "bfloat16") for u in ups[1:]]])
    assert "arrives as 'float32'; the run's wire dtype is bfloat16" in s.logs[ROUND].rejected["client-000"]
    assert sorted(s.server.history[-1][1].client_ids) == [f"client-{k:03d}" for k in range(1, N)]


def test_warm_start_uploads_are_corrected_by_the_warm_part_of_the_last_global(
    shapes: dict[str, tuple[int, int]],
) -> None:
    from florist.aggregation.lowrank import warm_parts, without_warm_part

    s = strategy(shapes, "lora.warm_start=true")
    first = [honest(shapes, k, common=1.0) for k in range(N)]
    s.aggregate_train(1, [reply(u) for u in first])
    g1 = s.server.history[-1][1].global_update
    second = [same_client(honest(shapes, 10 + k, common=0.5), k) for k in range(N)]
    s.aggregate_train(2, [reply(u, merged=(1,)) for u in second])
    want = dense([without_warm_part(u, warm_parts(g1, RANK)) for u in second])
    assert_close_products(products(s), want)


def same_client(update: ClientUpdate, k: int) -> ClientUpdate:
    """``update`` (drawn with another seed) as client ``k`` sends it: its id and example count."""
    return replace(update, client_id=client_id(k), num_examples=10.0 * (k + 1))


def test_accumulated_warm_start_uploads_are_corrected_by_the_warm_part_of_every_global_so_far(
    shapes: dict[str, tuple[int, int]],
) -> None:
    from florist.aggregation.lowrank import warm_parts, warm_source, without_warm_part

    s = strategy(shapes, "lora.warm_start=true", "lora.warm_from='accumulated'")
    for t in (1, 2):
        ups = [same_client(honest(shapes, 10 * t + k, common=1.0 / t), k) for k in range(N)]
        s.aggregate_train(t, [reply(u, merged=tuple(range(1, t))) for u in ups])
    sent = [r.global_update for _, r in s.server.history[:2]]
    third = [same_client(honest(shapes, 30 + k, common=0.3), k) for k in range(N)]
    s.aggregate_train(3, [reply(u, merged=(1, 2)) for u in third])
    want = dense([without_warm_part(u, warm_parts(warm_source(sent, "accumulated"), RANK)) for u in third])
    assert_close_products(products(s), want)
    last = dense([without_warm_part(u, warm_parts(sent[-1], RANK)) for u in third])
    assert not torch.allclose(want[next(iter(want))], last[next(iter(last))], atol=1e-4)  # it matters
