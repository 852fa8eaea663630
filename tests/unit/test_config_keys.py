"""``florist config``: every key has help; the listing covers every key; the starter config is
valid TOML that loads back to the defaults; an existing file is not overwritten."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import tomllib

from florist.cli import main
from florist.commands.keys import config_keys, section_help, starter_toml
from florist.config import FloristConfig, load_config


def every_key() -> list[str]:
    cfg = FloristConfig()
    return [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(FloristConfig)
        for f in dataclasses.fields(getattr(cfg, s.name))
    ]


def test_every_key_has_help_and_every_section_a_description() -> None:
    rows = config_keys()
    assert [r["key"] for r in rows] == every_key()
    assert [r["key"] for r in rows if len(r["help"]) < 10] == []
    assert set(section_help()) == {s.name for s in dataclasses.fields(FloristConfig)}


def test_the_starter_config_loads_back_to_the_defaults(tmp_path: Path) -> None:
    text = starter_toml()
    tree = tomllib.loads(text)
    written = {f"{s}.{k}" for s, values in tree.items() for k in values}
    unset = {r["key"] for r in config_keys() if r["default"] is None}
    assert written == set(every_key()) - unset  # unset keys are there, commented out
    for key in unset:
        assert f"# {key.split('.', 1)[1]} = ...   (unset)" in text
    path = tmp_path / "starter.toml"
    path.write_text(text)
    assert load_config(path) == FloristConfig()


def test_cli_lists_keys_as_json_and_writes_a_starter_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == every_key()
    path = tmp_path / "florist.toml"
    assert main(["config", "--starter", str(path)]) == 0
    first = path.read_text()
    assert main(["config", "--starter", str(path)]) == 2  # exists: refused, left as it was
    assert "exists" in capsys.readouterr().err and path.read_text() == first
    assert main(["config"]) == 0
    assert "aggregation.method" in capsys.readouterr().out
