"""One loader for run configs: a TOML file, then ``section.key=value`` overrides, then validation.

    cfg = load_config("configs/dolly.toml", ["federation.rounds=5", "aggregation.tau=0.8"])
    cfg = load_config("dolly")   # a packaged config by name (src/florist/configs/)

Values in overrides are TOML values (``5``, ``0.8``, ``[16, 8]``, ``"q_proj"``); a bare word that is
not valid TOML is taken as a string. An unknown section or key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from florist.config.packaged import PACKAGED
from florist.config.schema import FloristConfig
from florist.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FloristConfig:
    """The validated ``FloristConfig`` from an optional TOML file and ``key=value`` overrides."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        tree = _read_toml(Path(path))
    parsed = [parse_override(item) for item in overrides]
    _drop_replaced_budget(tree, {key for key, _ in parsed})
    for key, value in parsed:
        set_dotted(tree, key, value)
    return build(tree)


BUDGET_KEYS = ("steps", "epochs", "examples")


def _drop_replaced_budget(tree: dict[str, Any], overridden: set[str]) -> None:
    """A local budget is one choice: overriding ``train.steps`` replaces the file's ``train.examples``."""
    given = {name for name in BUDGET_KEYS if f"train.{name}" in overridden}
    train = tree.get("train")
    if given and isinstance(train, dict):
        for name in set(BUDGET_KEYS) - given:
            train.pop(name, None)


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it is a file, else the packaged config of that name (``dolly``, ``dolly.toml``,
    ``configs/dolly.toml``: ``src/florist/configs/``, so ``florist run dolly`` works anywhere)."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.name if given.suffix == ".toml" else f"{given.name}.toml"
    packaged = PACKAGED / name
    if packaged.is_file():
        return packaged
    known = sorted(p.stem for p in PACKAGED.glob("*.toml"))
    raise ConfigError(f"config file {str(path)!r} does not exist (nor a packaged config; packaged: {known})")


def _read_toml(path: Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    section, dot, name = key.partition(".")
    if not dot or "." in name:
        raise ConfigError(f"config key {key!r} must be section.key, e.g. federation.rounds")
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"config section {section!r} must be a table")
    node[name] = value


def build(tree: Mapping[str, Any]) -> FloristConfig:
    """``FloristConfig`` from nested plain values, rejecting unknown sections and keys by name."""
    sections = {f.name: f for f in dataclasses.fields(FloristConfig)}
    kwargs = {}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; known: {sorted(sections)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {name!r} must be a table, got {values!r}")
        kwargs[name] = _build_section(name, _section_type(name), values)
    return FloristConfig(**kwargs)


def _section_type(name: str) -> type:
    return typing.get_type_hints(FloristConfig)[name]  # type: ignore[no-any-return]


def _build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{key}; {section} has: {', '.join(known)}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    budget_given = kwargs.get("epochs") is not None or kwargs.get("examples") is not None
    if section == "train" and budget_given and "steps" not in kwargs:
        kwargs["steps"] = None  # epochs or examples given alone replace the default step count
    return cls(**kwargs)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to the annotated type ``hint`` (lists become tuples), or a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        unset = value is None or (isinstance(value, str) and value.lower() == "none")
        if unset and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint}")


def to_toml(cfg: FloristConfig) -> str:
    """The resolved config as TOML (tomli_w); an unset (None) value is written as the string "none"."""
    tree = {section: {k: "none" if v is None else v for k, v in values.items()}
            for section, values in cfg.to_dict().items()}  # fmt: skip
    return tomli_w.dumps(tree)


def _toml_value(value: Any) -> str:
    """One value as inline TOML, for Flower's flat run config, whose values are one-line strings."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def from_flower_run_config(run_config: Mapping[str, Any]) -> FloristConfig:
    """``FloristConfig`` from Flower's flat run config (``--run-config``, ``[tool.flwr.app.config]``).

    ``config`` names a TOML file; every other key is ``section.key`` with a scalar value, and string
    values are read as TOML values (so ``"lora.ranks" = "[16, 8, 4]"`` gives a list).
    """
    path = run_config.get("config")
    overrides = []
    for key, value in run_config.items():
        if key == "config":
            continue
        text = value if isinstance(value, str) else _toml_value(value)
        overrides.append(f"{key}={text}")
    return load_config(str(path) if path else None, overrides)


def flat_defaults(cfg: FloristConfig | None = None) -> dict[str, Any]:
    """Every ``section.key`` with a Flower-run-config scalar (lists and None as TOML strings)."""
    out: dict[str, Any] = {}
    for section, values in (cfg or FloristConfig()).to_dict().items():
        for key, value in values.items():
            if value is None:
                value = "none"
            scalar = isinstance(value, (bool, int, float, str))
            out[f"{section}.{key}"] = value if scalar else _toml_value(value)
    return out
