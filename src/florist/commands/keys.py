"""``florist config``: every configuration key with its type, default and help; a commented starter.

The keys, types, defaults and help texts are read from the config dataclasses (``florist.config``),
so this list cannot drift from what ``florist run`` accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import tomli_w

import florist.config.schema as schema
from florist.config import FloristConfig
from florist.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the keys as JSON")
    out.add_argument("--starter", metavar="FILE", help="write a commented starter config to FILE (new file)")
    out.add_argument(
        "--app-dir", action="store_true", help="print the folder of florist's Flower App (for flwr run)"
    )


def main(args: argparse.Namespace) -> None:
    """``florist config``: every key as a table (or ``--json``), a starter file, or the app's folder."""
    from rich.table import Table

    from florist.tables import make_console

    if args.app_dir:
        from florist.deploy.runconfig import DEFAULT_APP

        print(DEFAULT_APP)
        return
    if args.starter:
        path = Path(args.starter)
        if path.exists():
            raise ConfigError(f"{args.starter} exists; give a new file name")
        path.write_text(starter_toml(), encoding="utf-8")
        print(f"wrote {args.starter}: run it with  florist run {args.starter}")
        return
    rows = config_keys()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="florist configuration keys (section.key=value on any command line)")
    for column in ("key", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["key"], r["type"], json.dumps(r["default"]), r["help"])
    make_console().print(table)


def config_keys(cfg: FloristConfig | None = None) -> list[dict[str, Any]]:
    """One row per ``section.key``: its type, value in ``cfg`` (default: florist's defaults), help."""
    cfg = cfg or FloristConfig()
    rows = []
    for section in dataclasses.fields(FloristConfig):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            rows.append(
                {
                    "key": f"{section.name}.{f.name}",
                    "type": str(f.type),
                    "default": _plain(getattr(values, f.name)),
                    "help": f.metadata.get("help", ""),
                }
            )
    return rows


def section_help() -> dict[str, str]:
    """Each section's one-line description (the schema module's table of sections)."""
    out = {}
    for line in (schema.__doc__ or "").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0].startswith("[") and parts[0].endswith("]"):
            out[parts[0][1:-1]] = parts[1].strip()
    return out


def starter_toml(cfg: FloristConfig | None = None) -> str:
    """A TOML config with every key at its value in ``cfg`` (default: the defaults), each under its
    help as a comment; keys that are unset by default are written commented out. ``load_config`` of
    it gives ``cfg`` back."""
    sections = section_help()
    lines = [
        "# florist configuration: every key, with its help. Run it with  florist run THIS.toml",
        "# Keys left out take their defaults; any key can also be given as section.key=value.",
    ]
    current = None
    for row in config_keys(cfg):
        section, key = row["key"].split(".", 1)
        if section != current:
            current = section
            lines += ["", f"[{section}]", f"# {sections.get(section, '')}".rstrip()]
        lines.append(f"# {row['help']}  ({row['type']})")
        value = row["default"]
        if value is None:
            lines.append(f"# {key} = ...   (unset)")
        else:
            lines.append(tomli_w.dumps({key: value}).strip())
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
