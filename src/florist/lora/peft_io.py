"""Read and write PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

Reading folds nothing: each module's ``LoraFactors`` keeps PEFT's own scaling
(``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``).
Writing sets ``lora_alpha = scaling * r`` per module so that PEFT's merge adds exactly
``scaling * B @ A``. Only safetensors are read or written: pickle files are refused.
No transformers or peft import here.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from florist.errors import ConfigError, InvalidUpdate
from florist.fsutil import atomic_dir, give_normal_mode, write_json_atomic
from florist.lora.update import ClientUpdate, LoraFactors, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class PeftAdapter:
    """A LoRA adapter as read from (or to be written to) a PEFT directory."""

    modules: dict[str, LoraFactors]
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    def to_update(self, client_id: str, num_examples: float) -> ClientUpdate:
        return ClientUpdate(client_id=client_id, num_examples=num_examples, modules=self.modules)


def read_adapter(path: str | Path, client: str | None = None) -> PeftAdapter:
    """Load a PEFT LoRA adapter directory; errors name ``client`` (default: the path)."""
    root = Path(path)
    cid = client if client is not None else str(root)
    config = _read_config(root, cid)
    tensors = _read_tensors(root / WEIGHTS_NAME)
    pairs = _pair_keys(tensors, cid)
    modules = {name: _factors(name, a, b, config, cid) for name, (a, b) in sorted(pairs.items())}
    if not modules:
        raise InvalidUpdate(cid, f"{WEIGHTS_NAME} holds no lora_A/lora_B weights")
    return PeftAdapter(
        modules=modules,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        config=config,
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, or ``ConfigError`` naming it (truncated, random, empty, huge header)."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ValueError...
        raise ConfigError(f"{str(path)!r} is not a readable safetensors file: {err}") from err


def _read_config(root: Path, cid: str) -> dict[str, Any]:
    if not root.is_dir():
        raise ConfigError(f"adapter directory {str(root)!r} does not exist")
    if not (root / WEIGHTS_NAME).is_file():
        pickles = [n for n in PICKLE_NAMES if (root / n).exists()]
        if pickles:
            raise ConfigError(
                f"{str(root / pickles[0])!r} is a pickle file; florist reads safetensors only "
                f"(re-save the adapter with safe_serialization=True)"
            )
        raise ConfigError(f"{str(root)!r} has no {WEIGHTS_NAME}")
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise ConfigError(f"{str(root)!r} has no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(cfg_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{str(cfg_path)!r} must hold a JSON object, got {type(config).__name__}")
    _check_supported(config, cid)
    _check_config_values(config, cfg_path)
    return config


def _check_config_values(config: Mapping[str, Any], path: Path) -> None:
    """The keys florist reads have the types PEFT gives them; anything else names key and file."""

    def fail(key: str, want: str) -> ConfigError:
        return ConfigError(f"{str(path)!r}: {key} must be {want}, got {config[key]!r:.80}")

    if "r" in config and not _is_number(config["r"], integer=True):
        raise fail("r", "an integer")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise fail("lora_alpha", "a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise fail(key, "an object of module pattern -> number")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{str(path)!r}: {key} pattern {pattern!r} is not a regex: {err}") from err
            if not _is_number(value, integer=key == "rank_pattern"):
                raise ConfigError(f"{str(path)!r}: {key}[{pattern!r}] must be a number, got {value!r:.80}")


def _is_number(value: Any, integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(value).is_integer() if integer else math.isfinite(value)


def _check_supported(config: Mapping[str, Any], cid: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidUpdate(cid, f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise InvalidUpdate(cid, "DoRA adapters (use_dora=true) are not plain LoRA and cannot be aggregated")
    if config.get("modules_to_save"):
        raise InvalidUpdate(
            cid,
            f"modules_to_save {config['modules_to_save']!r} holds full weights; only LoRA factors aggregate",
        )


def _pair_keys(tensors: Mapping[str, torch.Tensor], cid: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise InvalidUpdate(
                cid, f"unsupported tensor {key!r} in {WEIGHTS_NAME} (only lora_A/lora_B weights)"
            )
        name = m["module"].removeprefix(PREFIX)
        found.setdefault(name, {})[m["which"]] = t
    pairs = {}
    for name, ab in found.items():
        for which in "AB":
            if which not in ab:
                raise InvalidUpdate(cid, f"lora_{which}.weight is missing", module=name)
        pairs[name] = (ab["A"], ab["B"])
    return pairs


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: a key matches when the module name ends with it (as a regex, at a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _factors(name: str, A: torch.Tensor, B: torch.Tensor, config: Mapping[str, Any], cid: str) -> LoraFactors:
    rank = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank:
        raise InvalidUpdate(
            cid,
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree with the declared rank r={rank} "
            f"in {CONFIG_NAME}",
            module=name,
        )
    return LoraFactors(A=A, B=B, scaling=lora_scaling(alpha, rank, bool(config.get("use_rslora", False))))


def adapter_config(
    modules: Mapping[str, LoraFactors], base_model: str | None = None, fan_in_fan_out: bool = False
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict whose merge adds exactly ``scaling * B @ A`` per module."""
    ranks = {name: f.rank for name, f in modules.items()}
    alphas = {name: f.scaling * f.rank for name, f in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": float(r),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter_files(
    directory: Path,
    modules: Mapping[str, LoraFactors],
    *,
    base_model: str | None = None,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write the two PEFT files into an existing, private ``directory`` (see ``write_adapter``)."""
    if not modules:
        raise ConfigError("refusing to write an adapter with no modules")
    tensors = {}
    for name, f in sorted(modules.items()):
        f = f if f.core is None else f.folded()  # a PEFT LoRA has no core
        tensors[f"{PREFIX}{name}.lora_A.weight"] = f.A.detach().to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = f.B.detach().to(dtype).contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    give_normal_mode(directory / WEIGHTS_NAME)  # safetensors writes 0600; the JSON beside it is 0644
    write_json_atomic(directory / CONFIG_NAME, adapter_config(modules, base_model, fan_in_fan_out))


def write_adapter(
    path: str | Path,
    modules: Mapping[str, LoraFactors],
    *,
    base_model: str | None = None,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write ``modules`` as a PEFT adapter directory at ``path``, atomically.

    PEFT's merge of the result adds exactly ``scaling * B @ A`` (in ``dtype``) to each module.
    """
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_adapter_files(tmp, modules, base_model=base_model, fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    return Path(path)


BASE_FILE = "florist_base.json"  # in an adapter dir: the base as florist loads it (model.name)
PROMPT_FILE = "florist_prompt.json"  # in an adapter dir: the prompt template it trained on


def florist_base(adapter: Path) -> str | None:
    """The base model an adapter dir of a florist run trained on, as ``model.name`` names it (the
    embedded SmolLM2 by florist's name, since its weights are not the hub's); None for other adapters."""
    return _named(adapter / BASE_FILE, "model", "base", "base model")


def trained_quantization(adapter: Path) -> str | None:
    """The quantization of the base an adapter dir of a florist run trained on (``model.quantization``:
    "nf4", "int8"), None for a full-precision base or another tool's adapter."""
    path = adapter / BASE_FILE
    if not path.is_file():
        return None
    florist_base(adapter)  # the record is whole
    value = json.loads(path.read_text(encoding="utf-8")).get("quantization")
    return value if isinstance(value, str) and value else None


def florist_template(adapter: Path) -> str | None:
    """The prompt template (``data.template``) an adapter dir of a florist run trained on; None for
    other adapters."""
    return _named(adapter / PROMPT_FILE, "template", "prompt", "prompt template")


def _named(path: Path, key: str, record: str, what: str) -> str | None:
    """The non-empty string under ``key`` of florist's JSON ``record`` at ``path``; None without the
    file, a ``ConfigError`` naming the file when it is not such a record."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(f"{str(path)!r} is not florist's {record} record: {err}") from err
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{str(path)!r} names no {what}")
    return value


def adapter_dir(source: str | Path) -> Path:
    """A run directory's final adapter (``RUN/adapter``), or ``source`` itself if it is an adapter."""
    root = Path(source)
    if (root / "adapter" / "adapter_config.json").is_file():
        return root / "adapter"
    if (root / "adapter_config.json").is_file():
        return root
    raise ConfigError(
        f"{str(source)!r} is neither a run directory (with adapter/) nor a PEFT adapter directory"
    )
