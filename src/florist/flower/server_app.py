"""The Flower ServerApp: hello, T rounds of train + aggregate + evaluate, a final sync, the run dir
(the run itself is ``florist.flower.federation.Federation``).

flwr run / deployment:   serverapp = "florist.flower.server_app:app"  (config from the run config)
florist run:             make_server_app(cfg)
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from florist.config import FloristConfig
from florist.config.loader import from_flower_run_config
from florist.flower.federation import Federation


def run_federation(grid: Grid, cfg: FloristConfig) -> dict[str, Any]:
    """Run the whole federation on ``grid``; returns the summary (also in RUN/summary.json)."""
    return Federation(cfg, grid).run()


def make_server_app(
    cfg: FloristConfig | None = None, on_summary: Any = None, on_error: Any = None
) -> ServerApp:
    """A ServerApp for ``cfg`` (None: from the run config); callbacks receive the summary or the error."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_federation(
                grid, cfg if cfg is not None else from_flower_run_config(context.run_config)
            )
        except BaseException as err:
            if on_error is None:
                raise
            on_error(err)
            return
        if on_summary is not None:
            on_summary(summary)

    return app


app = make_server_app()
