"""Saved uploads and results files record what produced them; a run under other settings is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florist.config import load_config
from florist.errors import ConfigError
from florist.studies.provenance import MANIFEST, check_meta, claim, differences, fingerprint


def test_fingerprint_holds_what_training_depends_on_and_not_what_acts_after_the_upload() -> None:
    base = fingerprint(load_config(None))
    assert base["train.lr"] == load_config(None).train.lr and "model.name" in base
    for key in ("aggregation.tau=0.8", "federation.wire_dtype='bfloat16'", "lora.warm_start=true",
                "federation.uplink_tau=0.9", "eval.max_length=64", "lora.init='per_client'"):  # fmt: skip
        assert fingerprint(load_config(None, [key])) == base, key
    assert differences(base, fingerprint(load_config(None, ["train.lr=0.5"]))) == [
        f"train.lr: {base['train.lr']!r} there, 0.5 now"
    ]


def test_claim_records_a_new_folder_then_checks_it(tmp_path: Path) -> None:
    folder = tmp_path / "uploads" / "cell"
    claim(folder, {"train.lr": 0.001, "lora.ranks": (16,)}, "remedy")
    assert (folder / MANIFEST).is_file()
    claim(folder, {"train.lr": 0.001, "lora.ranks": (16,)}, "remedy")  # the same settings: reused
    with pytest.raises(ConfigError, match=r"another config: train\.lr: 0\.001 there, 0\.002 now; remedy"):
        claim(folder, {"train.lr": 0.002, "lora.ranks": (16,)}, "remedy")
    with pytest.raises(ConfigError, match=r"lora\.ranks: \[16\] there, None now"):
        claim(folder, {"train.lr": 0.001}, "remedy")
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match=r"provenance\.json is unreadable"):
        claim(folder, {"train.lr": 0.001}, "remedy")


def test_an_unlabelled_folder_with_uploads_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "client-000").mkdir()
    with pytest.raises(ConfigError, match=r"holds uploads but no provenance\.json"):
        claim(tmp_path, {"train.lr": 0.001}, "remove it")
    assert not (tmp_path / MANIFEST).exists() and (tmp_path / "client-000").is_dir()


def test_check_meta_refuses_another_regime_and_accepts_a_new_file(tmp_path: Path) -> None:
    check_meta(tmp_path / "results.json", None, {"lr": 0.001})
    nested = differences({"train": {"lr": 0.001, "batch": 4}}, {"train": {"lr": 0.002, "batch": 4}})
    assert nested == ["train.lr: 0.001 there, 0.002 now"]  # the key that differs, not the whole section
    check_meta(tmp_path / "results.json", {"lr": 0.001, "budget": [1]}, {"lr": 0.001, "budget": (1,)})
    with pytest.raises(ConfigError, match=r"results\.json holds results of another regime: lr: 0\.001 there"):
        check_meta(tmp_path / "results.json", {"lr": 0.001}, {"lr": 0.003})


def test_uploads_recorded_before_a_key_existed_are_reused_at_its_default_only(tmp_path: Path) -> None:
    now = fingerprint(load_config(None))
    folder = tmp_path / "cell"
    folder.mkdir()
    older = {k: v for k, v in now.items() if k != "data.template"}  # written before data.template existed
    (folder / MANIFEST).write_text(json.dumps({"config": older}))
    claim(folder, now, "remedy")  # the new key at its default: the old behaviour, reused
    with pytest.raises(ConfigError, match=r"data\.template: 'alpaca' there, 'chat' now"):
        claim(folder, fingerprint(load_config(None, ["data.template='chat'"])), "remedy")
