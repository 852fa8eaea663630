"""Reliability scenarios on Flower's simulation runtime with a tiny random Llama.

dropout:    30 % of 10 clients fail each round (seeded, [faults]); every round's global update equals
            the dense aggregate of the survivors' saved uploads with renormalised weights.
quorum:     fewer survivors than federation.min_replies: rounds skipped, global model unchanged, the
            run stops after max_skipped_rounds with a checkpoint and exit code 3.
stragglers: a client slower than federation.round_timeout is left out of its round; its late reply
            is discarded and logged; it catches up and ends with the server's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florist.cli import main
from florist.client.faults import dropped_clients
from florist.config import to_toml
from florist.flower.simulation import run_simulation
from florist.lora.peft_io import read_adapter
from tests.flower_helpers import save_tiny_model, tiny_run_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def survivors_dense(round_dir: Path) -> dict[str, torch.Tensor]:
    """sum_{k in S} (n_k / sum_S n) scaling_k B_k A_k over the uploads saved for the round."""
    ups = []
    for d in sorted((round_dir / "clients").iterdir()):
        n = json.loads((d / "florist.json").read_text())["num_examples"]
        ups.append(read_adapter(d).to_update(d.name, n))
    total = sum(u.num_examples for u in ups)
    names = sorted(ups[0].modules)
    return {k: sum((u.num_examples / total) * u.modules[k].delta(torch.float64) for u in ups) for k in names}  # type: ignore[misc]


def test_dropout_rounds_equal_the_survivors_aggregate(model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(
        model_dir, tmp_path, "dropout", "federation.num_clients=10", "lora.ranks=[4]", "aggregation.tau=1.0",
        "faults.drop_fraction=0.3", "faults.seed=7", "eval.every=0", "data.skills_train=20",
    )  # fmt: skip
    summary = run_simulation(cfg)
    run = Path(summary["run_dir"])
    assert summary["rounds"] == 2 and summary["rounds_skipped"] == []
    for r in records(run)[1:]:
        t = r["round"]
        dropped = [f"client-{k:03d}" for k in dropped_clients(cfg.faults, t, 10)]
        assert len(dropped) == 3
        assert sorted(r["rejected"]) == dropped and all(
            "injected failure" in v for v in r["rejected"].values()
        )
        assert r["aggregated"] == sorted(set(r["clients"]) - set(dropped))
        round_dir = run / "rounds" / f"round-{t:03d}"
        assert sorted(d.name for d in (round_dir / "clients").iterdir()) == r["aggregated"]
        want = survivors_dense(round_dir)
        got = {k: f.delta(torch.float64) for k, f in read_adapter(round_dir / "adapter").modules.items()}
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    assert dropped_clients(cfg.faults, 1, 10) != dropped_clients(cfg.faults, 2, 10)
    assert summary["sync"]["clients_match_server"]  # dropped clients caught up at the end


def test_quorum_loss_skips_rounds_then_stops_with_a_checkpoint(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_run_config(
        model_dir, tmp_path, "quorum", "federation.rounds=3", "federation.min_replies=2",
        "federation.max_skipped_rounds=2", "faults.drop_fraction=0.6", "eval.every=0",
    )  # fmt: skip
    path = tmp_path / "quorum.toml"
    path.write_text(to_toml(cfg))
    assert main(["run", str(path)]) == 3
    console = capsys.readouterr()  # the ServerApp's log, as florist run shows it
    run = tmp_path / "quorum"
    lines = records(run)
    assert [r["round"] for r in lines] == [0, 1, 2]
    for r in lines[1:]:
        assert "1 usable update(s), 2 required" in r["skipped"]
        assert len(r["rejected"]) == 2
    assert (
        "round 1 skipped, global model unchanged: 1 usable update(s), 2 required" in console.out + console.err
    )
    assert not (run / "rounds").exists()  # no global update was ever made
    assert (run / "checkpoints" / "round-002.pt").is_file()
    assert not (run / "summary.json").exists()


def test_a_run_whose_every_round_was_skipped_stops_non_zero_saying_why(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fewer skipped rounds than max_skipped_rounds, yet none aggregated: no adapter, exit 3, one line."""
    cfg = tiny_run_config(
        model_dir, tmp_path, "none", "federation.rounds=2", "federation.min_replies=3",
        "federation.max_skipped_rounds=3", "faults.drop_fraction=0.5", "eval.every=0", "eval.before=false",
    )  # fmt: skip
    path = tmp_path / "none.toml"
    path.write_text(to_toml(cfg))
    assert main(["run", str(path)]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("florist run:")]
    assert len(err) == 1 and "no round was aggregated (2 skipped)" in err[0] and "3 required" in err[0]
    assert not (tmp_path / "none" / "adapter").exists()


def test_a_straggler_is_left_out_and_its_late_reply_discarded(model_dir: Path, tmp_path: Path) -> None:
    # 20 s to train a round, 28 s for the straggler: honest clients stay inside the deadline while
    # two pytest workers share the machine's two cores (make test)
    cfg = tiny_run_config(
        model_dir, tmp_path, "straggler", "federation.rounds=3", "federation.round_timeout=20.0",
        "federation.cpus_per_client=1.0", "faults.slow_clients=[1]", "faults.slow_rounds=[2]",
        "faults.slow_seconds=28.0", "eval.every=0",
    )  # fmt: skip
    summary = run_simulation(cfg)
    lines = records(Path(summary["run_dir"]))
    everyone = ["client-000", "client-001", "client-002"]
    assert lines[2]["timed_out"] == ["client-001"] and lines[2]["aggregated"] == ["client-000", "client-002"]
    assert lines[1]["aggregated"] == everyone and lines[3]["aggregated"] == everyone
    assert summary["rounds"] == 3
    assert [(x["round"], x["client"]) for x in summary["late_replies"]] == [(2, "client-001")]
    assert summary["sync"]["clients_match_server"]
