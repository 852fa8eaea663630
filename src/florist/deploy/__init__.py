"""A Flower deployment with TLS and SuperNode authentication: certificates, processes, ``florist deploy``.

certs.py      a CA, the SuperLink's certificate, SuperNode keys (OpenSSH ECDSA)
processes.py  processes with logs in files, every descendant pid recorded, stopped by pid
launch.py     ``Deployment``: SuperLink, registered SuperNodes, ``flwr run``
runconfig.py  the run config passed to ``flwr run``
command.py    the ``florist deploy`` command

``add_parser`` and ``cli`` import command.py when called, not when ``florist.cli`` is imported.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``florist deploy`` on the ``florist`` command's subparsers."""
    from florist.deploy.command import add_parser as add

    add(sub)


def cli(args: argparse.Namespace) -> None:
    """Run ``florist deploy`` with parsed ``args``."""
    from florist.deploy.command import cli as run

    run(args)
