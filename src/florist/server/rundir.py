"""The run directory: everything a run leaves behind, written atomically.

RUN/config.toml                   the resolved config (re-runnable: florist run RUN/config.toml)
RUN/metrics.jsonl                 one JSON line per round (round 0: the base model)
RUN/rounds/round-001/adapter/     the global update of round 1, a PEFT adapter dir
RUN/rounds/round-001/clients/ID/  each client's upload (run.save_client_updates), with florist.json
RUN/adapter/                      the final cumulative adapter: the base model plus it is the result
RUN/summary.json                  the figures printed at the end
RUN/checkpoints/round-003.pt      the server's state after round 3 (florist.server.checkpoint)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from florist.config import FloristConfig, to_toml
from florist.errors import ConfigError
from florist.fsutil import atomic_dir, safe_name, write_json_atomic, write_text_atomic
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.peft_io import BASE_FILE, PROMPT_FILE, save_adapter_files, write_adapter


def default_name(cfg: FloristConfig) -> str:
    return f"{cfg.aggregation.method}-{dt.datetime.now():%Y%m%d-%H%M%S}"


class RunDir:
    """Writes one run's outputs under ``path``, refusing to reuse a non-empty directory.

    With ``run.resume`` the directory must hold an earlier run (its config.json); its config files are
    rewritten only when ``run.force`` accepted a changed config.
    """

    def __init__(self, cfg: FloristConfig, base_model: str) -> None:
        """Checks only: nothing is created until ``create`` (after the model and data have loaded)."""
        self.cfg = cfg
        self.tracker: Any = None  # the TensorBoard writer (run.tensorboard), made on first use
        self.path = Path(cfg.run.dir) / safe_name(cfg.run.name or default_name(cfg), "run.name")
        self.base_model = base_model
        if cfg.run.resume:
            if not (self.path / "config.json").is_file():
                raise ConfigError(f"run.resume: {str(self.path)!r} holds no earlier run (no config.json)")
        elif self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(
                f"run directory {str(self.path)!r} exists and is not empty; set run.name, "
                f"or resume it with run.resume=true (florist run ... --resume)"
            )

    def create(self) -> None:
        """Make the directory and write the resolved config (a resume keeps its own unless forced)."""
        if self.cfg.run.resume and not self.cfg.run.force:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        named = replace(self.cfg, run=replace(self.cfg.run, name=self.path.name))  # RUN/config.toml --resume
        write_text_atomic(self.path / "config.toml", to_toml(named))
        write_json_atomic(self.path / "config.json", named.to_dict())

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def restore(self, round: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Back to the state after ``round``: metrics.jsonl holds ``records``; later round dirs go."""
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in records)
        write_text_atomic(self.path / "metrics.jsonl", text)
        for d in sorted((self.path / "rounds").glob("round-*")):
            if int(d.name.removeprefix("round-")) > round:
                shutil.rmtree(d)

    def round_dir(self, round: int) -> Path:
        return self.path / "rounds" / f"round-{round:03d}"

    def global_adapter(self, round: int, modules: Mapping[str, LoraFactors]) -> Path:
        return write_adapter(self.round_dir(round) / "adapter", modules, base_model=self.base_model)

    def client_updates(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        for u in updates:
            with atomic_dir(self.round_dir(round) / "clients" / safe_name(u.client_id, "client id")) as tmp:
                save_adapter_files(tmp, u.modules, base_model=self.base_model)
                write_json_atomic(tmp / "florist.json", {"num_examples": u.num_examples})

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """One line per call; flushed and synced so a crash loses at most the line being written."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.cfg.run.tensorboard:
            if self.tracker is None:
                from florist.server.tracking import TensorBoard

                self.tracker = TensorBoard(self.path / "tensorboard")
            self.tracker.record(record)

    def final_adapter(self, modules: Mapping[str, LoraFactors]) -> Path:
        """The run's adapter, with ``florist_prompt.json`` saying which prompt template it trained on
        (``data.template``: serve it with the same one) and ``florist_base.json`` naming its base as
        ``model.name`` does, with ``model.quantization`` when the clients' base was quantized
        (``florist export --merge`` loads that base, in full precision)."""
        path = write_adapter(self.path / "adapter", modules, base_model=self.base_model, overwrite=True)
        write_json_atomic(path / PROMPT_FILE, {"template": self.cfg.data.template})
        quant = self.cfg.model.quantization
        write_json_atomic(
            path / BASE_FILE,
            {"model": self.cfg.model.name} | ({} if quant == "none" else {"quantization": quant}),
        )
        return path

    def summary(self, data: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", data)
