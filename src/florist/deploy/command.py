"""``florist deploy CONFIG.toml --nodes N [--workdir DIR] [--port P] [--app DIR] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from florist.cli_parsing import IntermixedParser
from florist.config import FloristConfig
from florist.deploy.prelaunch import check_before_start, stopped_on_sigterm
from florist.deploy.processes import DeploymentError
from florist.deploy.runconfig import DEFAULT_APP, deploy_config, run_dir

if TYPE_CHECKING:  # launch.py needs cryptography: imported when a deployment starts, not to parse a command
    from florist.deploy.launch import DeploySettings


def deploy(
    cfg: FloristConfig, settings: DeploySettings, echo: IO[str] | None = None
) -> dict[str, Any] | None:
    """Start the deployment, run ``cfg`` through it, stop every process; the run's summary (None: an
    app other than florist's, ``--app``, handed none back)."""
    from florist.deploy.launch import Deployment

    with Deployment(settings, echo) as deployment:
        deployment.start()
        return deployment.run(cfg)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``florist deploy``'s arguments."""
    p.__class__ = IntermixedParser
    p.add_argument("config", help="TOML config file, or a packaged one by name (demo, dolly, ...)")
    p.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (federation.num_clients)")
    p.add_argument(
        "--workdir",
        help="certificates, keys, FLWR_HOME, logs, pids.json (default: RUN-deployment beside RUN)",
    )
    p.add_argument("--port", type=int, help="SuperLink port on 127.0.0.1 (default: a free port)")
    p.add_argument("--app", default=str(DEFAULT_APP), help="the Flower App directory (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. federation.rounds=5")


def main(args: argparse.Namespace) -> None:
    """``florist deploy``: prints where the run directory is and the summary; raises if the run failed."""
    from florist.deploy.launch import DeploySettings
    from florist.tables import print_summary

    cfg = deploy_config(args.config, args.nodes, args.overrides)
    check_before_start(cfg)  # before the SuperLink and SuperNodes start
    workdir = Path(args.workdir) if args.workdir else run_dir(cfg).with_name(f"{cfg.run.name}-deployment")
    settings = DeploySettings(workdir=workdir, nodes=args.nodes, app=Path(args.app), port=args.port)
    print(f"run directory: {run_dir(cfg)}\ndeployment files and logs: {workdir.resolve()}", flush=True)
    with stopped_on_sigterm():  # so every process is still stopped
        summary = deploy(cfg, settings, echo=sys.stdout)
    if summary is None:
        print(f"{args.app} ran to its end and handed back no florist summary")
        return
    print_summary(summary)
    if summary.get("rounds") != cfg.federation.rounds:
        raise DeploymentError(
            f"the federation completed {summary.get('rounds')} of {cfg.federation.rounds} rounds"
        )
