"""Round 1's raw uploads, trained once per (rank setting, init) and shared by the bench's variants.

Kept as PEFT dirs under ``<cache>/<setting>/<init>/<client>/`` beside ``provenance.json``, the config
keys round-1 training depended on (``florist.studies.provenance``): a cache trained under other values is
refused with the keys that differ, never reused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from florist.client.local import client_id
from florist.config import FloristConfig
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora import ClientUpdate
from florist.lora.peft_io import read_adapter, save_adapter_files
from florist.studies.provenance import claim, fingerprint
from florist.studies.simulate import shared_round_one

log = logging.getLogger(__name__)


class RoundOneCache:
    """Round 1's raw uploads per (setting, init): in memory, on disk, or trained once."""

    def __init__(self, root: Path) -> None:
        self.root, self.memory = root, dict[str, list[ClientUpdate]]()

    def get(self, cfg: FloristConfig, setting: str, init: str) -> list[ClientUpdate]:
        key = f"{setting}/{init}"
        if key not in self.memory:
            claim(self.root / key, fingerprint(cfg), f"remove {self.root / key} or pass another --cache")
            self.memory[key] = self._load(cfg, key) or self._train(cfg, key, init)
        return self.memory[key]

    def _load(self, cfg: FloristConfig, key: str) -> list[ClientUpdate] | None:
        dirs = [self.root / key / client_id(k) for k in range(cfg.federation.num_clients)]
        if not all((d / "florist.json").is_file() for d in dirs):
            return None
        log.info("round 1 (%s): uploads from %s", key, self.root / key)
        sizes = [json.loads((d / "florist.json").read_text())["num_examples"] for d in dirs]
        return [read_adapter(d, d.name).to_update(d.name, n) for d, n in zip(dirs, sizes, strict=True)]

    def _train(self, cfg: FloristConfig, key: str, init: str) -> list[ClientUpdate]:
        log.info("round 1 (%s): training once for the variants that share it", key)
        updates = shared_round_one(replace(cfg, lora=replace(cfg.lora, init=init)))
        for u in updates:
            with atomic_dir(self.root / key / u.client_id, overwrite=True) as tmp:
                save_adapter_files(tmp, u.modules, base_model=cfg.model.name)
                write_json_atomic(tmp / "florist.json", {"num_examples": u.num_examples})
        return updates
