"""What produced a folder of saved uploads or a results file, so that a rerun never mixes two regimes.

The bench, the regime study and the client sweep keep clients' uploads on disk and finished cells in
``results.json`` so that a killed run continues. Reuse is only sound under the same settings: a folder
of uploads records the config keys its training depended on (``provenance.json``) and a results file
its regime (``meta``); a run under other values is refused with every key that differs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from florist.config import FloristConfig
from florist.config.loader import flat_defaults
from florist.errors import ConfigError
from florist.fsutil import write_json_atomic

MANIFEST = "provenance.json"
SECTIONS = ("model.", "data.", "lora.", "train.")
FEDERATION = ("federation.num_clients", "federation.seed", "federation.fraction", "federation.participation")
AFTER_UPLOAD = ("lora.init", "lora.warm_start", "lora.warm_split", "lora.warm_from")  # init: in the path


def fingerprint(cfg: FloristConfig) -> dict[str, Any]:
    """The config keys a client's training depends on (model, data, LoRA shape, local budget, clients,
    seed), as ``flat_defaults`` writes them; not the aggregator or the protocol options."""
    flat = flat_defaults(cfg)
    keep = [k for k in flat if k.startswith(SECTIONS) or k in FEDERATION]
    return {k: flat[k] for k in sorted(keep) if k not in AFTER_UPLOAD}


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: <recorded> there, <now> now`` for every key whose values differ (absent: None); nested
    mappings are compared key by key (``train.lr: ...``)."""
    now = json.loads(json.dumps(now))  # as it would read back from disk (tuples as lists)
    out = []
    for k in sorted(recorded.keys() | now.keys()):
        a, b = recorded.get(k), now.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def added_since(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """``recorded`` with the fingerprint keys florist gained after it was written read as their
    defaults: a new key's default keeps the old behaviour, so uploads trained before it existed stay
    reusable while a non-default value of it is still refused."""
    defaults = fingerprint(FloristConfig())
    later = {k: defaults[k] for k in now if k not in recorded and k in defaults}
    return {**json.loads(json.dumps(later)), **recorded}


def claim(folder: Path, now: Mapping[str, Any], remedy: str) -> None:
    """Make ``folder`` hold uploads trained under ``now``: record it in a new or empty folder, else
    check the record; a ``ConfigError`` if it differs or the folder has uploads and no record."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder} holds uploads but no {MANIFEST} saying what trained them; {remedy}")
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest, {"config": dict(now)})
        return
    try:
        recorded = json.loads(manifest.read_text())["config"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{manifest} is unreadable ({err}); {remedy}") from err
    diff = differences(added_since(recorded, now), now)
    if diff:
        raise ConfigError(f"{folder} holds uploads trained under another config: {'; '.join(diff)}; {remedy}")


def check_meta(path: Path, recorded: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """Refuse to add to the results file ``path`` made in another regime (its ``recorded`` meta)."""
    diff = differences(recorded, now) if recorded is not None else []
    if diff:
        raise ConfigError(f"{path} holds results of another regime: {'; '.join(diff)}; "
                          "pass another --out or remove it")  # fmt: skip
