"""Run config: TOML + overrides, types, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

import florist
from florist.aggregation import available
from florist.cli import main
from florist.config import load_config, to_toml
from florist.config.loader import from_flower_run_config
from florist.errors import ConfigError


def test_toml_then_overrides_then_types(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        "[federation]\nrounds = 5\nnum_clients = 3\n[lora]\nranks = [8, 4, 2]\n[aggregation]\ntau = 0.8\n"
    )
    cfg = load_config(
        path, ["federation.rounds=2", "train.lr=1e-3", "lora.target_modules=q_proj", "eval.mmlu=none"]
    )
    assert cfg.federation.rounds == 2 and cfg.federation.num_clients == 3
    assert cfg.lora.ranks == (8, 4, 2) and cfg.lora.target_modules == ("q_proj",)
    assert cfg.aggregation.tau == 0.8 and cfg.train.lr == 1e-3 and cfg.eval.mmlu is None
    assert cfg.lora.settings(1, 3).rank == 4 and cfg.lora.settings(1, 3).alpha == 8.0


def test_resolved_toml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=1.5", "federation.participation=[[0], [1, 2]]", "federation.num_clients=3",
                             "federation.rounds=2", "lora.ranks=[4]", "train.max_grad_norm=none"])  # fmt: skip
    assert cfg.train.steps is None and cfg.train.epochs == 1.5
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_flower_run_config_reads_lists_from_strings() -> None:
    cfg = from_flower_run_config(
        {"federation.num_clients": 2, "lora.ranks": "[16, 4]", "aggregation.method": "flora"}
    )
    assert cfg.lora.ranks == (16, 4) and cfg.aggregation.method == "flora" and cfg.federation.num_clients == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "federation.roundz=3",
            r"unknown config key federation\.roundz; federation has: num_clients, rounds",
        ),
        ("fed.rounds=3", r"unknown config section 'fed'"),
        ("rounds=3", r"config key 'rounds' must be section\.key"),
        ("federation.rounds=2.5", r"federation\.rounds must be an integer, got 2\.5"),
        ("train.train_on_inputs=1", r"train\.train_on_inputs must be true or false"),
        ("aggregation.method='fedavg'", r"aggregation\.method must be one of .*got 'fedavg'"),
        ("lora.ranks=[8, 4]", r"lora\.ranks has 2 entries; give one, or one per client \(4\)"),
        ("lora.ranks=[8, 0, 4, 4]", r"lora\.ranks must be positive integers"),
        ("federation.participation=[[0], [5], [1]]", r"participation round 2: \[5\] must be distinct client"),
        ("federation.participation=[[0]]", r"participation lists 1 rounds; rounds = 3"),
        ("federation.fraction=0", r"federation\.fraction must be in \(0, 1\], got 0"),
        ("model.dtype='float8'", r"model\.dtype must be one of"),
        ("data.split='random'", r"data\.split must be presplit, iid, dirichlet or by_label, got 'random'"),
        ("lora.warm_from='first'", r"lora\.warm_from must be one of \['last', 'accumulated'\], got 'first'"),
        (
            "lora.warm_from='accumulated'",
            r"'accumulated' needs lora\.warm_start = true; without warm start set",
        ),
    ],
)
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_tau_with_a_method_that_has_no_rank_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'fedit' does not take aggregation.tau \(florist's rank cut\)"):
        load_config(None, ["aggregation.method='fedit'", "aggregation.tau=0.9"])


PACKAGED = sorted(p.stem for p in (Path(florist.__file__).parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("config", PACKAGED)
@pytest.mark.parametrize("method", available())
def test_a_packaged_config_switches_to_any_method_in_one_step(config: str, method: str) -> None:
    """Switching a config written for one method to another is refused once, in one line naming every
    key the method does not take, and the overrides that line gives are all it takes."""
    switch = f"aggregation.method={method!r}"
    try:
        cfg = load_config(config, [switch])
    except ConfigError as refused:
        message = str(refused)
        assert "\n" not in message and message.startswith(f"aggregation.method = {method!r} does not take ")
        fixes = message.split("To run it, add: ")[1].split(" ")
        cfg = load_config(config, [switch, *fixes])
    cfg.aggregator()  # builds: nothing is left to refuse at build time either
    assert cfg.aggregation.method == method


def test_the_demo_switched_to_fedit_names_all_five_keys_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config("demo", ["aggregation.method='fedit'"])
    fixes = str(refused.value).split("To run it, add: ")[1]
    assert fixes == (
        "aggregation.tau=none aggregation.error_feedback=false lora.warm_start=false lora.warm_from='last' "
        "federation.uplink_tau=none"
    )


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 3\n")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(bad)


def test_cli_run_reports_an_unknown_key_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[federation]\nrounds = 1\n")
    assert main(["run", str(path), "train.stepz=3"]) == 2
    assert "unknown config key train.stepz" in capsys.readouterr().err


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[2]
    from florist.config import DEMO_CONFIG

    for path in [*sorted((root / "configs").glob("*.toml")), Path(DEMO_CONFIG)]:
        cfg = load_config(path)
        assert cfg.federation.rounds >= 1, path


def test_flower_app_declares_every_config_key() -> None:
    """flwr run accepts --run-config only for declared keys; the app's values must load as a FloristConfig."""
    import tomllib

    from florist.config.loader import flat_defaults
    from florist.deploy.runconfig import DEFAULT_APP

    app = DEFAULT_APP / "pyproject.toml"
    declared = tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(flat_defaults())
    cfg = from_flower_run_config(declared)
    assert (
        cfg.lora.ranks == (16, 12, 8, 4) and cfg.federation.participation is None and cfg.data.format is None
    )


def test_budget_override_replaces_the_files_budget(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[train]\nexamples = 64\n")
    assert load_config(path).train.examples == 64
    cfg = load_config(path, ["train.steps=3"])
    assert (cfg.train.steps, cfg.train.examples, cfg.train.epochs) == (3, None, None)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(path, ["train.steps=3", "train.epochs=1"])


def test_a_packaged_config_loads_by_name_and_a_missing_one_is_named(tmp_path: Path) -> None:
    assert load_config("dolly").federation.num_clients == 8
    assert load_config("configs/dolly.toml") == load_config("dolly")  # the old path still works
    with pytest.raises(ConfigError, match=r"config file 'nope.toml' does not exist .*packaged: \[.*'demo'"):
        load_config("nope.toml")


@pytest.mark.parametrize(
    ("override", "why"),
    [
        (
            "federation.uplink_cut='weights'",
            r"federation.uplink_cut must be one of \['adapter', 'change'\], got 'weights'",
        ),
        ("federation.max_client_weight=0.0", r"federation.max_client_weight must be in \(0, 1\], got 0.0"),
        ("federation.max_client_weight=1.5", r"federation.max_client_weight must be in \(0, 1\], got 1.5"),
        ("data.validation_per_label=-2", r"data.validation_per_label must be >= 0, got -2"),
        ("train.compile='yes'", r"train.compile"),
    ],
)
def test_the_new_config_keys_refuse_bad_values_by_name(override: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_config(None, [override])


def test_a_runs_byte_budget_is_priced_at_its_wire_dtype() -> None:
    """``aggregation.budget_mb`` buys directions at the run's wire price: on a bf16 wire twice as many
    bytes' worth of rank as on float32 (it was priced at float32 whatever the wire)."""
    from florist.aggregation import communication
    from tests.helpers import make_updates

    updates = make_updates([8, 8, 8])
    down = {}
    for wire in ("float32", "bfloat16"):
        cfg = load_config(None, [f"federation.wire_dtype={wire!r}", "aggregation.budget_mb=0.0012"])
        agg = cfg.aggregator()
        assert agg.wire_bytes == {"float32": 4, "bfloat16": 2}[wire]  # type: ignore[attr-defined]
        result = agg.aggregate(updates)
        per_client = communication(updates[:1], result, wire).downlink_total
        assert per_client <= 1200
        down[wire] = sum(result.ranks.values())
    assert down["bfloat16"] > down["float32"]
