"""The Flower ServerApp: hello, T rounds of train + aggregate + evaluate, a final sync, the run dir
(the run itself is ``florist.flower.federation.Federation``). ``florist run``, ``florist deploy``,
``flwr run`` and a deployment all run it as ``serverapp = "florist.flower.server_app:app"``, with the
florist config in Flower's run config.

Under a SuperLink that florist started (``florist.deploy.link``), ``FLORIST_OUTCOME`` names a file:
the app writes the summary there, or the florist error that stopped the run; then it returns instead
of raising, so the console shows that one line and not Flower's traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from florist.config import FloristConfig
from florist.config.loader import from_flower_run_config
from florist.console import setup_logging
from florist.deploy.link import OUTCOME_ENV
from florist.errors import FloristError
from florist.flower.federation import Federation
from florist.fsutil import write_json_atomic


def run_federation(grid: Grid, cfg: FloristConfig) -> dict[str, Any]:
    """Run the whole federation on ``grid``; returns the summary (also in RUN/summary.json)."""
    return Federation(cfg, grid).run()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()  # a Flower process: florist's lines on its stream, as florist prints them
    outcome = os.environ.get(OUTCOME_ENV)
    try:
        summary = run_federation(grid, from_flower_run_config(context.run_config))
    except FloristError as err:
        if not outcome:
            raise
        write_json_atomic(Path(outcome), {"error": type(err).__name__, "message": str(err)})
        return
    if outcome:
        write_json_atomic(Path(outcome), {"summary": summary})
