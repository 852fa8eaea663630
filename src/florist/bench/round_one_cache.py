"""Round 1's raw uploads, trained once per (rank setting, init) and shared by the bench's variants.

The uploads are kept as PEFT dirs under ``<cache>/<setting>/<init>/<client>/`` beside
``round_one.json``, which records every config key that round-1 training depends on (model, data,
LoRA shape, local budget, clients, seed; not the aggregator or the protocol options, which act after
the upload). A cache trained under other values is refused with the keys that differ, never reused:
reusing it would compare a variant against uploads from another regime.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from florist.bench.simulate import client_name, shared_round_one
from florist.config import FloristConfig
from florist.config.loader import flat_defaults
from florist.errors import ConfigError
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora import ClientUpdate
from florist.lora.peft_io import read_adapter, save_adapter_files

log = logging.getLogger(__name__)
MANIFEST = "round_one.json"
SECTIONS = ("model.", "data.", "lora.", "train.")
FEDERATION = ("federation.num_clients", "federation.seed", "federation.fraction", "federation.participation")
AFTER_UPLOAD = ("lora.init", "lora.warm_start", "lora.warm_split", "lora.warm_from")  # init: in the path


def fingerprint(cfg: FloristConfig) -> dict[str, Any]:
    """The config keys round-1 training depends on, as ``flat_defaults`` writes them."""
    flat = flat_defaults(cfg)
    keep = [k for k in flat if k.startswith(SECTIONS) or k in FEDERATION]
    return {k: flat[k] for k in sorted(keep) if k not in AFTER_UPLOAD}


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: <recorded> there, <now> now`` for every key whose values differ (absent: None)."""
    keys = sorted(recorded.keys() | now.keys())
    differ = [k for k in keys if recorded.get(k) != now.get(k)]
    return [f"{k}: {recorded.get(k)!r} there, {now.get(k)!r} now" for k in differ]


class RoundOneCache:
    """Round 1's raw uploads per (setting, init): in memory, on disk, or trained once."""

    def __init__(self, root: Path) -> None:
        self.root, self.memory = root, dict[str, list[ClientUpdate]]()

    def get(self, cfg: FloristConfig, setting: str, init: str) -> list[ClientUpdate]:
        key = f"{setting}/{init}"
        if key not in self.memory:
            self.memory[key] = self._load(cfg, key) or self._train(cfg, key, init)
        return self.memory[key]

    def _load(self, cfg: FloristConfig, key: str) -> list[ClientUpdate] | None:
        dirs = [self.root / key / client_name(k) for k in range(cfg.federation.num_clients)]
        if not all((d / "florist.json").is_file() for d in dirs):
            return None
        self._check(self.root / key / MANIFEST, fingerprint(cfg))
        log.info("round 1 (%s): uploads from %s", key, self.root / key)
        sizes = [json.loads((d / "florist.json").read_text())["num_examples"] for d in dirs]
        return [read_adapter(d, d.name).to_update(d.name, n) for d, n in zip(dirs, sizes, strict=True)]

    @staticmethod
    def _check(manifest: Path, now: dict[str, Any]) -> None:
        """A ``ConfigError`` naming the differing keys unless ``manifest`` records ``now``."""
        remedy = f"remove {manifest.parent} or pass another --cache"
        if not manifest.is_file():
            raise ConfigError(f"round-1 cache {manifest.parent} has no {MANIFEST} (its config); {remedy}")
        try:
            recorded = json.loads(manifest.read_text())["config"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"round-1 cache manifest {manifest} is unreadable ({err}); {remedy}") from err
        diff = differences(recorded, now)
        if diff:
            raise ConfigError(f"round-1 cache {manifest.parent} was trained under another config: "
                              f"{'; '.join(diff)}; {remedy}")  # fmt: skip

    def _train(self, cfg: FloristConfig, key: str, init: str) -> list[ClientUpdate]:
        log.info("round 1 (%s): training once for the variants that share it", key)
        updates = shared_round_one(replace(cfg, lora=replace(cfg.lora, init=init)))
        (self.root / key).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / key / MANIFEST, {"config": fingerprint(cfg)})  # first: see _load
        for u in updates:
            with atomic_dir(self.root / key / u.client_id, overwrite=True) as tmp:
                save_adapter_files(tmp, u.modules, base_model=cfg.model.name)
                write_json_atomic(tmp / "florist.json", {"num_examples": u.num_examples})
        return updates
