"""The run config a deployment passes to ``flwr run``: only what differs from the Flower App's
declared values, with local paths made absolute (the apps run in Flower's own processes)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from florist.config import FloristConfig, load_config
from florist.config.loader import flat_defaults
from florist.errors import ConfigError

DEFAULT_APP = Path(__file__).resolve().parents[1] / "flower_app"  # the Flower App, shipped in the wheel


def app_config(app: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the Flower App at ``app``."""
    path = app / "pyproject.toml"
    tree = tomllib.loads(path.read_text(encoding="utf-8"))
    table = tree.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [tool.flwr.app.config] table")
    return table


def run_overrides(cfg: FloristConfig, declared: Mapping[str, Any]) -> dict[str, Any]:
    """The ``section.key`` values of ``cfg`` that differ from what the Flower App declares.

    Flower accepts run-config overrides only for declared keys, so a key the app does not declare
    is an error when ``cfg`` sets it to anything but florist's default.
    """
    defaults = flat_defaults()
    out = {}
    for key, value in flat_defaults(cfg).items():
        if key in declared:
            if declared[key] != value:
                out[key] = value
        elif value != defaults[key]:
            raise ConfigError(
                f"{key}={value!r} cannot be passed to the Flower App: its pyproject.toml does not "
                "declare the key in [tool.flwr.app.config]"
            )
    return out


def overrides_toml(overrides: Mapping[str, Any]) -> str:
    """A TOML file for ``flwr run --run-config FILE``: one quoted ``"section.key" = value`` per key."""
    return tomli_w.dumps(
        {key: v if isinstance(v, (bool, int, float)) else str(v) for key, v in overrides.items()}
    )


def run_dir(cfg: FloristConfig) -> Path:
    """RUN, where the ServerApp writes: ``run.dir`` must be absolute and ``run.name`` set."""
    if not Path(cfg.run.dir).is_absolute():
        raise ConfigError(f"run.dir must be an absolute path for a deployment, got {cfg.run.dir!r}")
    if not cfg.run.name:
        raise ConfigError("run.name must be set for a deployment, so that its run directory is known")
    return Path(cfg.run.dir) / cfg.run.name


def deploy_config(path: str | None, nodes: int, overrides: Sequence[str] = ()) -> FloristConfig:
    """The run's config: ``federation.num_clients`` from ``nodes``, local paths absolute, a run name.

    The apps run in Flower's processes, so ``run.dir`` and every path that exists relative to the
    current directory (``model.name``, ``data.source``, ``data.test``, ``eval.mmlu``) is made absolute.
    """
    cfg = load_config(path, [f"federation.num_clients={nodes}", *overrides])
    if cfg.federation.num_clients != nodes:
        raise ConfigError(f"federation.num_clients={cfg.federation.num_clients} contradicts --nodes {nodes}")
    name = cfg.run.name or f"deploy-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=_absolute_if_exists(cfg.model.name)),
        data=dataclasses.replace(
            cfg.data, source=_absolute_if_exists(cfg.data.source), test=_absolute_if_exists(cfg.data.test)
        ),
        eval=dataclasses.replace(cfg.eval, mmlu=_absolute_if_exists(cfg.eval.mmlu)),
        run=dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir).resolve()), name=name),
    )


def _absolute_if_exists(value: str | None) -> Any:
    if value is not None and Path(value).exists():
        return str(Path(value).resolve())
    return value
