"""The ``florist`` command line: the index of subcommands, each parsed and run by its own module.

Every module in ``COMMANDS`` has ``add_arguments(parser)`` and ``main(args)``, next to the code the
command runs. Only the module of the command being run is imported, so ``florist --help`` and a
light command never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from florist.console import setup_logging
from florist.errors import FloristError, QuorumLost

COMMANDS: dict[str, tuple[str, str]] = {  # name: (module, one line for ``florist --help``)
    "run": ("florist.commands.run", "run a federation (Flower simulation runtime) from a TOML config"),
    "demo": (
        "florist.commands.demo",
        "federated FLoRIST on SmolLM2 and the embedded skills set (~10 min on CPU)",
    ),
    "deploy": (
        "florist.deploy.command",
        "a federation on a local TLS + SuperNode-auth Flower deployment (separate processes)",
    ),
    "config": ("florist.commands.keys", "every configuration key with its type, default and help; a starter"),
    "aggregate": (
        "florist.commands.aggregate",
        "aggregate PEFT LoRA adapter directories into one global adapter",
    ),
    "inspect": ("florist.commands.inspect", "ranks, shapes and singular values of a PEFT LoRA adapter"),
    "export": (
        "florist.commands.export",
        "a run's adapter merged into its base model, or re-compressed under a rank cap",
    ),
    "eval": (
        "florist.eval.harness",
        "a run's adapter (and its base) scored by lm-evaluation-harness on any lm-eval or local task",
    ),
    "report": (
        "florist.commands.report",
        "a run's curves (loss vs round and vs bytes, ranks) as PNGs in RUN/report/",
    ),
    "compare": (
        "florist.commands.compare",
        "aggregate 8 client adapters on SmolLM2-135M shapes and verify with peft",
    ),
    "bench": (
        "florist.studies.headline",
        "every method on the paper's Dolly federation: total bytes vs paired loss",
    ),
    "regime": (
        "florist.studies.regime",
        "round-1 study: FLoRIST's kept rank and bytes vs batch, budget, init",
    ),
    "client-sweep": (
        "florist.studies.client_sweep",
        "FLoRIST's kept rank and bytes, and FLoRA's, against the client count",
    ),
    "privacy-study": (
        "florist.studies.privacy",
        "held-out loss and a membership attack against epsilon, per method",
    ),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("florist")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is one (global options come before it)."""
    return next((a for a in argv if a in COMMANDS), None)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ModuleType]:
    """Parse ``argv``; the arguments and the module of the command they name."""
    parser = argparse.ArgumentParser(
        prog="florist",
        description="Federated LoRA fine-tuning with FLoRIST aggregation. "
        "`florist COMMAND --help` lists a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"florist {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    module = None
    for name, (path, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            module = importlib.import_module(path)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    assert module is not None  # argparse exits on a missing or unknown command
    return args, module


def main(argv: Sequence[str] | None = None) -> int:
    args, module = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        module.main(args)
    except BrokenPipeError:  # `florist inspect --json | head`: the reader has gone, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except QuorumLost as err:
        print(f"florist {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    except FloristError as err:
        print(f"florist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable output, a full disk, a missing file: the message names the path
        print(f"florist {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
