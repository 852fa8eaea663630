"""The Flower ClientApp: local LoRA training on a node, following its aggregator's protocol.

Messages it answers (see server_app.py for the other side):
    query.hello   -> its client id, index, rank and number of examples
    train         <- the global updates it is missing; -> its trained LoRA factors and metrics
    query.sync    <- the global updates it is missing; -> a digest of its merged weights
    query.init    <- rows (Fed-SB's round 0); -> the summed gradient of its adapted base weights

    florist run, flwr run, deployment:   clientapp = "florist.flower.client_app:app"  (the run config)

A handler that fails (a data set it cannot load, a model that does not fit its device, an injected
fault) logs one line naming the client and the cause and replies with that line as the message's
error, which the server logs or stops on (``florist.flower.handshake``): no traceback per node on
the console (``-v`` logs it at DEBUG).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from florist.client.faults import before_reply
from florist.client.local import client_id
from florist.config import FloristConfig
from florist.config.loader import from_flower_run_config
from florist.console import quiet_imports
from florist.errors import FloristError
from florist.flower.codec import encode_gradient, encode_upload
from florist.flower.node import (
    Node,
    get_node,
    globals_by_round,
    node_examples,
    partition_id,
    stored_globals,
)

quiet_imports()  # Flower's client process: before peft and transformers are first imported

log = logging.getLogger(__name__)


def downloads(msg: Message) -> dict[int, ArrayRecord]:
    """The global updates in a message, by round."""
    return globals_by_round(msg.content)


def hello(cfg: FloristConfig, msg: Message, context: Context) -> Message:
    n = cfg.federation.num_clients
    k = partition_id(context, n)
    info: dict[str, Any] = {
        "client_id": client_id(k),
        "index": k,
        "rank": cfg.lora.rank_of(k, n),
        "num_examples": len(node_examples(cfg, context)),
        "held": [int(t) for t in stored_globals(context)],
    }
    return Message(RecordDict({"client": ConfigRecord(info)}), reply_to=msg)


def train(cfg: FloristConfig, msg: Message, context: Context) -> Message:
    node = get_node(cfg, context)
    node.receive(downloads(msg), context)
    rnd = int(msg.content.config_records["config"]["round"])  # type: ignore[arg-type]
    update, stats = node.client.fit(rnd)
    before_reply(cfg.faults, rnd, node.index, cfg.federation.num_clients)
    arrays, meta = encode_upload(
        update.modules,
        with_a=node.client.rules.uploads_a,
        wire=cfg.federation.wire_dtype,
    )
    private = {"train_loss": stats.loss, "tokens": stats.tokens, "label_tokens": stats.label_tokens,
               "train_seconds": stats.seconds}  # fmt: skip
    metrics = MetricRecord(
        {
            "num-examples": update.num_examples,
            "steps": stats.steps,
            # DP-SGD: these depend on the secretly sampled rows, without noise, so they stay home
            **({} if node.client.dp is not None else private),
            **({"epsilon": stats.epsilon} if stats.epsilon is not None else {}),
        }
    )
    content = RecordDict({"lora": arrays, "lora_meta": meta, "metrics": metrics, "client": _identity(node)})
    return Message(content, reply_to=msg)


def sync(cfg: FloristConfig, msg: Message, context: Context) -> Message:
    node = get_node(cfg, context)
    node.receive(downloads(msg), context)
    identity = _identity(node)
    identity["digest"] = node.digest()
    return Message(RecordDict({"client": identity}), reply_to=msg)


def init(cfg: FloristConfig, msg: Message, context: Context) -> Message:
    node = get_node(cfg, context)
    rows = int(msg.content.config_records["config"]["rows"])  # type: ignore[arg-type]
    gradient = encode_gradient(node.client.init_gradient(rows), cfg.federation.wire_dtype)
    return Message(RecordDict({"gradient": gradient, "client": _identity(node)}), reply_to=msg)


Handler = Callable[[Message, Context], Message]


def one_line(handler: Handler) -> Handler:
    """``handler``, with any failure turned into one log line and an error reply naming the client."""

    @functools.wraps(handler)
    def replying(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # any failure on a node: reported, never a traceback flood
            reason = f"{_who(context)}: {failure(err)}"
            log.error("%s", reason)
            log.debug("%s", reason, exc_info=True)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return replying


def failure(err: BaseException) -> str:
    """One line for an exception: florist's own as their message, others with their type."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, FloristError) else f"{type(err).__name__}: {text}"


def _who(context: Context) -> str:
    raw = context.node_config.get("partition-id")
    try:
        return client_id(int(raw))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"node {context.node_id}"


def _identity(node: Node) -> ConfigRecord:
    return ConfigRecord({"client_id": node.client.client_id, "merged": [int(r) for r in node.merged]})


app = ClientApp()


@app.query("hello")
@one_line
def _hello(msg: Message, context: Context) -> Message:
    return hello(from_flower_run_config(context.run_config), msg, context)


@app.train()
@one_line
def _train(msg: Message, context: Context) -> Message:
    return train(from_flower_run_config(context.run_config), msg, context)


@app.query("sync")
@one_line
def _sync(msg: Message, context: Context) -> Message:
    return sync(from_flower_run_config(context.run_config), msg, context)


@app.query("init")
@one_line
def _init(msg: Message, context: Context) -> Message:
    return init(from_flower_run_config(context.run_config), msg, context)
