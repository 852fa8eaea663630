"""florist on Flower: the public API for a user's own ServerApp and ClientApp.

Server side (``flwr.serverapp.ServerApp``)::

    from florist.flower import FederatedLoRA

    strategy = FederatedLoRA.from_config(cfg)
    strategy.start(grid, ArrayRecord(), num_rounds=cfg.federation.rounds, evaluate_fn=strategy.evaluate_fn())
    strategy.save_adapter(out_dir)

Client side (``flwr.clientapp.ClientApp``): answer the two messages the strategy sends::

    from florist.flower import client_hello, client_train

    @app.query("hello")
    def hello(msg, context): return client_hello(cfg, msg, context)

    @app.train()
    def train(msg, context): return client_train(cfg, msg, context)

    @app.query("init")   # only methods with a round 0 (Fed-SB) send it
    def init(msg, context): return client_init(cfg, msg, context)

``client_train`` merges the global updates the message carries (catch-up included), starts or
warm-starts the node's LoRA as its method's protocol says, trains, and encodes the reply. A node's
client index is its ``partition-id`` node config. ``examples/own_flower_app`` runs both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from florist.flower.client_app import hello as client_hello
    from florist.flower.client_app import init as client_init
    from florist.flower.client_app import sync as client_sync
    from florist.flower.client_app import train as client_train
    from florist.flower.strategy import FederatedLoRA

__all__ = ["FederatedLoRA", "client_hello", "client_init", "client_sync", "client_train"]


def __getattr__(name: str) -> Any:  # imported on first use: the codec alone stays light
    if name == "FederatedLoRA":
        from florist.flower.strategy import FederatedLoRA

        return FederatedLoRA
    if name in {"client_hello", "client_train", "client_sync", "client_init"}:
        from florist.flower import client_app

        return getattr(client_app, name.removeprefix("client_"))
    raise AttributeError(f"module 'florist.flower' has no attribute {name!r}")
