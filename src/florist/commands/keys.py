"""``florist config``: every configuration key with its type, default and help; a commented starter.

The keys, types, defaults and help texts are read from the config dataclasses (``florist.config``),
so this list cannot drift from what ``florist run`` accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tomli_w

import florist.config.schema as schema
from florist.config import FloristConfig


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
