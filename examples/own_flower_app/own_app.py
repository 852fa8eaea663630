"""Your own Flower ServerApp and ClientApp, running florist's strategy under Flower's own
``Strategy.start()`` loop. Only florist's public API is used: ``florist.config`` for the
configuration and ``florist.flower`` for the strategy and the client-side handlers.

Run it with Flower (``pyproject.toml`` in this folder names the two apps)::

    flwr run examples/own_flower_app local --federation-config num-supernodes=2 \
        --run-config 'federation.rounds=3'       (a local SuperLink: README, "Flower")

or from Python, through a SuperLink of its own: ``florist.flower.simulation.Simulation(workdir,
app=Path("examples/own_flower_app"))``, then ``.start()`` and ``.run(cfg)`` (tests/integration/
test_own_flower_app.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from florist.config import FloristConfig, from_flower_run_config
from florist.flower import FederatedLoRA, client_hello, client_init, client_train

log = logging.getLogger("own_app")


def server_app_for(cfg: FloristConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` (None: the florist keys of Flower's run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )  # your own logging
        config = cfg if cfg is not None else from_flower_run_config(context.run_config)
        strategy = FederatedLoRA.from_config(config)
        result = strategy.start(
            grid,
            ArrayRecord(),  # florist's strategy keeps the global model itself
            num_rounds=config.federation.rounds,
            timeout=config.federation.timeout,
            evaluate_fn=strategy.evaluate_fn(),
        )
        out = strategy.save_adapter(Path(config.run.dir) / str(config.run.name) / "adapter")
        log.info(
            "adapter written to %s; server-side evaluation: %s", out, dict(result.evaluate_metrics_serverapp)
        )

    return app


def client_app_for(cfg: FloristConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` (None: the florist keys of Flower's run config). Its client index is
    the node's ``partition-id`` (as Flower's simulation sets it, or ``--node-config``)."""
    app = ClientApp()

    def config(context: Context) -> FloristConfig:
        return cfg if cfg is not None else from_flower_run_config(context.run_config)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        return client_hello(config(context), msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # your own code can go around this: logging, a custom data loader in the node's state, ...
        return client_train(config(context), msg, context)

    @app.query("init")  # only methods with a round 0 (Fed-SB) send it
    def init(msg: Message, context: Context) -> Message:
        return client_init(config(context), msg, context)

    return app


server_app = server_app_for()
client_app = client_app_for()
