"""Stragglers on a scripted grid (late replies are discarded and logged), and the message size guard."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import pytest
import torch
from flwr.app import Message, Metadata, RecordDict
from transformers import LlamaConfig, LlamaForCausalLM

from florist.flower.exchange import Exchange
from florist.server.global_model import adapted_shapes
from florist.server.size_guard import MessageTooLarge, check_estimate, check_message, estimate


class ScriptedGrid:
    """Replies to node ``n`` become available ``delay[n]`` seconds after the message was pushed."""

    def __init__(self, delay: dict[int, float]) -> None:
        self.delay, self.sent = delay, {}  # type: ignore[var-annotated]
        self.count = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            self.count += 1
            mid = f"m{self.count}"
            self.sent[mid] = (m.metadata.dst_node_id, time.monotonic() + self.delay[m.metadata.dst_node_id])
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in ids:
            node, ready = self.sent.get(mid, (None, float("inf")))
            if node is not None and time.monotonic() >= ready:
                del self.sent[mid]
                out.append(Message(content=RecordDict(), metadata=_reply_meta(node, mid)))
        return out


def _reply_meta(node: int, mid: str) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"r-{mid}", src_node_id=node, dst_node_id=0, reply_to_message_id=mid,
        group_id="", created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip


def _msg(node: int) -> Message:
    meta = Metadata(
        run_id=1, message_id="", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip
    return Message(content=RecordDict(), metadata=meta)


def test_a_straggler_is_left_out_and_its_late_reply_discarded(caplog: pytest.LogCaptureFixture) -> None:
    grid = ScriptedGrid({1: 0.0, 2: 0.0, 3: 0.6})
    ex = Exchange(grid, poll_seconds=0.02)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING)
    replies, missing = ex.send_and_receive([_msg(1), _msg(2), _msg(3)], 1, timeout=0.2, phase="round 1")
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2] and missing == [3]
    grid.delay = {1: 0.5, 2: 0.5, 3: 0.5}
    replies, missing = ex.send_and_receive([_msg(1), _msg(2), _msg(3)], 2, timeout=2.0, phase="round 2")
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3] and missing == []
    assert [(x.round, x.node_id, x.arrived_in) for x in ex.late] == [(1, 3, "round 2")]
    assert "late reply from node 3 for round 1 arrived during round 2: discarded" in caplog.text
    assert not ex.outstanding


def llama_7b_shapes() -> dict[str, tuple[int, int]]:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return adapted_shapes(model, ("q_proj", "v_proj"))


def test_flora_with_many_clients_at_7b_shapes_is_refused_with_the_estimate() -> None:
    shapes = llama_7b_shapes()
    assert len(shapes) == 64 and shapes["model.layers.0.self_attn.q_proj"] == (4096, 4096)
    est = estimate("flora", shapes, [64] * 64)
    assert est.download == 64 * 64 * (4096 + 4096) * 4 * 64  # R (m + n) floats per module, 64 modules
    with pytest.raises(MessageTooLarge, match=r"flora with 64 clients: a download would be 8,589.9 MB"):
        check_estimate(est, "flora", 512.0, 64)
    # the same federation under FLoRIST: a warning for the tau = 1 bound, refused only by an actual message
    warning = check_estimate(estimate("florist", shapes, [64] * 64), "florist", 512.0, 64)
    assert warning is not None and "tau = 1" in warning
    assert (
        check_estimate(estimate("florist", shapes, [64] * 64, budget_mb=200.0), "florist", 512.0, 64) is None
    )
    assert check_estimate(estimate("fedit", shapes, [64] * 64), "fedit", 512.0, 64) is None  # 134 MB
    with pytest.raises(MessageTooLarge, match="the round 3 message to client-007 would be 600.0 MB"):
        check_message(600_000_000, 512.0, "the round 3 message to client-007")


def test_upload_estimate_matches_the_codec() -> None:
    from florist.flower.codec import encode_upload, payload_bytes
    from florist.lora import LoraFactors

    shapes = {"a": (16, 32), "b": (8, 32)}
    modules = {k: LoraFactors(A=torch.zeros(4, n), B=torch.zeros(m, 4)) for k, (m, n) in shapes.items()}
    arrays, _ = encode_upload(modules)
    assert estimate("fedit", shapes, [4]).upload == payload_bytes(RecordDict({"lora": arrays}))
    arrays, _ = encode_upload(modules, with_a=False)
    assert estimate("ffa", shapes, [4]).upload == payload_bytes(RecordDict({"lora": arrays}))
