"""Server checkpoints: one file per round, written atomically, checked by sha256 when read.

RUN/checkpoints/round-003.pt          torch.save of a dict of tensors, lists and strings
RUN/checkpoints/round-003.pt.sha256   its digest, written after it (a checkpoint without one is
                                      incomplete and is not used)

A checkpoint holds what the server needs to continue after round t exactly as if it had not
stopped: every round's global update (merge protocols replay them all), what each client holds,
the metrics lines so far, the count of consecutive skipped rounds, the RNG states, and the config
with its hash. Resuming with a different config is refused unless forced; a corrupt latest
checkpoint falls back to the one before it, with a warning that says why.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.config import FloristConfig
from florist.errors import ConfigError, FloristError
from florist.fsutil import write_bytes_atomic, write_text_atomic
from florist.lora import LoraFactors

log = logging.getLogger(__name__)
VERSION = 1


class CheckpointError(FloristError, RuntimeError):
    """No usable checkpoint to resume from."""


@dataclass
class ServerState:
    """Everything a resumed server needs, after round ``round`` (0: before round 1)."""

    round: int
    history: list[tuple[int, AggregationResult]] = field(default_factory=list)
    synced: dict[str, int] = field(default_factory=dict)  # client id -> last round it holds
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines
    skipped_streak: int = 0


def config_hash(cfg: FloristConfig) -> str:
    """sha256 of every section but [run] (where outputs go does not change the result)."""
    return hashlib.sha256(json.dumps(_hashed(cfg.to_dict()), sort_keys=True).encode()).hexdigest()


def _hashed(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k != "run"}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key`` entries whose values differ between two config dicts."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        out += [
            f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
    return out


# ---------------------------------------------------------------------------- writing


def save(folder: Path, state: ServerState, cfg: FloristConfig, keep: int) -> Path:
    """Write ``state`` as ``round-NNN.pt`` (+ its sha256) and keep only the latest ``keep``."""
    path = folder / f"round-{state.round:03d}.pt"
    buf = io.BytesIO()
    torch.save(_payload(state, cfg), buf)
    data = buf.getvalue()
    write_bytes_atomic(path, data, sync=True)
    write_text_atomic(_digest_path(path), hashlib.sha256(data).hexdigest() + "\n")
    for old in checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        _digest_path(old).unlink(missing_ok=True)
    return path


def _payload(state: ServerState, cfg: FloristConfig) -> dict[str, Any]:
    return {
        "version": VERSION,
        "round": state.round,
        "config": json.dumps(cfg.to_dict()),
        "config_hash": config_hash(cfg),
        "history": [_result_dict(t, r) for t, r in state.history],
        "synced": json.dumps(state.synced),
        "records": json.dumps(state.records),
        "skipped_streak": state.skipped_streak,
        "rng": _rng_state(),
    }


def _result_dict(round: int, r: AggregationResult) -> dict[str, Any]:
    per_client = None if r.per_client is None else {c: _factors(m) for c, m in r.per_client.items()}
    meta = {
        "method": r.method, "protocol": r.protocol.value, "client_ids": list(r.client_ids),
        "weights": r.weights, "sends_a": r.sends_a, "energy_kept": r.energy_kept, "seconds": r.seconds,
    }  # fmt: skip
    return {
        "round": round,
        "meta": json.dumps(meta),
        "global": _factors(r.global_update),
        "per_client": per_client,
        "residual": None if r.residual is None else _as_computed(r.residual),
    }


def _factors(modules: dict[str, LoraFactors]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, f in modules.items():
        if f.core is not None:  # the basis and the effective core (Fed-SB)
            core = (f.core.float() * f.scaling).contiguous()
            out[name] = {"A": f.A.float().contiguous(), "B": f.B.float().contiguous(), "core": core}
            continue
        B, A = f.effective()  # (m, p), (p, n)
        out[name] = {"A": A.contiguous(), "B": B.contiguous()}
    return out


def _as_computed(modules: dict[str, LoraFactors]) -> dict[str, dict[str, torch.Tensor]]:
    """Factors in the dtype they were computed in (a float64 aggregation's carried tail resumes exactly)."""
    return {name: {"A": f.A.contiguous(), "B": (f.B * f.scaling).contiguous()} for name, f in modules.items()}


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "rest": json.dumps([pos, has_gauss, cached]),
        },
    }


# ---------------------------------------------------------------------------- reading


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in round order."""
    return sorted(folder.glob("round-*.pt"))


def load_latest(folder: Path, cfg: FloristConfig, force: bool) -> ServerState:
    """The newest checkpoint that reads back intact; corrupt ones are reported and skipped."""
    found = checkpoints(folder)
    if not found:
        raise CheckpointError(f"no checkpoint in {str(folder)!r}: nothing to resume")
    problems = []
    for path in reversed(found):
        try:
            payload = read(path)
        except CheckpointError as err:
            problems.append(str(err))
            log.warning("%s; falling back to the checkpoint before it", err)
            continue
        check_config(payload, cfg, force)
        if problems and cfg.privacy.mode != "none":
            raise CheckpointError(
                f"{problems[0]}; under differential privacy the run cannot fall back to {path.name}: the "
                "rounds after it were released with noise, and running them again releases them again, "
                "which the accountant does not count. Repair the checkpoint or start a new run"
            )
        restore_rng(payload["rng"])
        log.info("resuming from %s (round %d)", path.name, payload["round"])
        return state_of(payload)
    raise CheckpointError("every checkpoint is unusable: " + "; ".join(problems))


def read(path: Path) -> dict[str, Any]:
    """The checkpoint's payload, after checking its sha256; CheckpointError names what is wrong."""
    digest_file = _digest_path(path)
    if not digest_file.is_file():
        raise CheckpointError(f"checkpoint {path.name} is incomplete (no {digest_file.name})")
    data = path.read_bytes()
    want = digest_file.read_text().strip()
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"checkpoint {path.name} is corrupt (sha256 differs from {digest_file.name})")
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path.name} cannot be read: {err}") from err
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path.name} has version {payload.get('version')}, expected {VERSION}"
        )
    return payload  # type: ignore[no-any-return]


FREE_UNDER_DP = ("eval",)  # what a forced resume may change under DP: it releases nothing (run: not hashed)


def check_config(payload: dict[str, Any], cfg: FloristConfig, force: bool) -> None:
    """Refuse to resume under a config other than the checkpoint's (unless ``force``), naming every
    key that changed. Keys the checkpoint does not know (added to florist since it was written) count
    as unchanged when they hold their default: they select what the older version did."""
    if payload["config_hash"] == config_hash(cfg):
        return
    stored = _hashed(json.loads(payload["config"]))
    current = _hashed(_json_roundtrip(cfg.to_dict()))
    added = _added_at_default(stored, current)
    diff = changed_keys(_with(stored, added, current), current)
    if not diff and added:
        log.info("resuming a checkpoint written before these keys existed (at their defaults): %s",
                 ", ".join(added))  # fmt: skip
        return
    text = "; ".join(diff) or "(the hashes differ)"
    private = [d for d in diff if d.split(".")[0] not in FREE_UNDER_DP] or ([] if diff else [text])
    modes = {json.loads(payload["config"]).get("privacy", {}).get("mode", "none"), cfg.privacy.mode}
    if force and modes != {"none"} and private:
        raise ConfigError(
            f"the config differs from the checkpoint's: {'; '.join(private)}. Under differential privacy "
            "the guarantee was computed for the checkpoint's config (noise, rounds, sampling, data), so "
            "--force cannot change these; start a new run"
        )
    if not force:
        raise ConfigError(
            f"the config differs from the checkpoint's: {text}. Resume with --force to accept it"
        )
    log.warning("resuming with a changed config (--force): %s", text)


def _added_at_default(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key`` entries of ``current`` absent from ``stored`` whose value is the default."""
    defaults = _json_roundtrip(FloristConfig().to_dict())
    return [
        f"{section}.{key}"
        for section, values in current.items()
        for key, value in values.items()
        if key not in stored.get(section, {}) and value == defaults.get(section, {}).get(key, object())
    ]


def _with(stored: dict[str, Any], keys: list[str], current: dict[str, Any]) -> dict[str, Any]:
    out = {section: dict(values) for section, values in stored.items()}
    for item in keys:
        section, key = item.split(".", 1)
        out.setdefault(section, {})[key] = current[section][key]
    return out


def _json_roundtrip(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(tree))
    return out  # tuples become lists, as in the stored copy


def state_of(payload: dict[str, Any]) -> ServerState:
    history = [(int(h["round"]), _result_of(h)) for h in payload["history"]]
    return ServerState(
        round=int(payload["round"]),
        history=history,
        synced={k: int(v) for k, v in json.loads(payload["synced"]).items()},
        records=json.loads(payload["records"]),
        skipped_streak=int(payload["skipped_streak"]),
    )


def _result_of(h: dict[str, Any]) -> AggregationResult:
    meta = json.loads(h["meta"])
    per_client = h["per_client"]
    return AggregationResult(
        method=meta["method"],
        protocol=ClientProtocol(meta["protocol"]),
        global_update=_modules(h["global"]),
        client_ids=tuple(meta["client_ids"]),
        weights=meta["weights"],
        per_client=None if per_client is None else {c: _modules(m) for c, m in per_client.items()},
        residual=None if h.get("residual") is None else _modules(h["residual"]),
        energy_kept=meta["energy_kept"],
        sends_a=meta["sends_a"],
        seconds=meta["seconds"],
    )


def _modules(tree: dict[str, dict[str, torch.Tensor]]) -> dict[str, LoraFactors]:
    return {name: LoraFactors(A=t["A"], B=t["B"], core=t.get("core")) for name, t in tree.items()}


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    version, internal, gauss = json.loads(rng["python"])
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, cached = json.loads(rng["numpy"]["rest"])
    keys = rng["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, cached))


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
