"""``florist privacy-study`` end to end on a tiny model and the skills set: every cell of both modes,
the table, the plot, and a rerun that trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florist.cli import main
from tests.flower_helpers import save_tiny_model

pytestmark = pytest.mark.integration


def test_privacy_study_writes_every_cell_and_resumes(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "privacy"
    args = ["privacy-study", "--out", str(out), "--cache", str(tmp_path / "cache"), "--epsilons", "8,inf",
            "--rounds", "1", "--clients", "6", "--fraction", "0.5", "--attack-rows", "2", f"model.name={str(model)!r}",
            "data.source='skills'", "data.split='dirichlet'", "data.test=none", "data.skills_train=24",
            "data.skills_test=6", "data.min_partition_size=2", "train.examples=4", "train.batch_size=2",
            "federation.num_clients=4", "eval.batch_size=4",
            # the client-level cells' Poisson sample of 6 at 0.5 is empty with probability 1/64 (the
            # round then releases noise alone); this seed draws 3 clients in round 1
            "privacy.noise_seed=0"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    # (dp-sgd + client + attack methods) x epsilons + base rows, less the noise rule without DP (it
    # is FLoRIST tau 0.9 there, one cell)
    assert len(results) == (5 + 7 + 2) * 2 + 3 - 1 and "client / FLoRIST noise rule / eps=inf" not in results
    for key, records in results.items():
        ev = records[-1]["eval"]
        assert ("attack" in ev) == key.startswith("attack"), key
        if key.startswith("attack") and "base model" not in key:
            rows = ev["attack"]
            assert [len(rows[k]) for k in ("member_rows", "non_member_rows", "member_base_rows")] == [2, 2, 2]
            assert rows["member_rows"] != rows["member_base_rows"], key  # the trained model, not the base
        if "eps=8" in key:
            assert 0 < records[-1]["privacy"]["epsilon"] <= 8.0, key
            assert key.startswith(("dp-sgd", "attack")) or records[-1]["privacy"]["sigma"] > 0
    table = (out / "table.md").read_text()
    assert "dp-sgd | FedIT | inf |" in table
    noise_rule = next(line for line in table.splitlines() if "client | FLoRIST noise rule | 8 |" in line)
    assert "nats (95% CI" in noise_rule.split("|")[6]  # paired against FLoRIST tau 0.9 without DP
    assert "| FLoRIST tau=0.90 | 8 |" in table and "calibrated by the base model" in table
    assert "| dp-sgd | base model | inf |" in table and "| client | base model | inf |" in table
    pivot, _ = table.split("Every cell:")
    client = pivot.split("`client` mode")[1]
    assert "| method | no DP | ε = 8 |" in client
    rule, tau = (next(r for r in client.splitlines() if r.startswith(f"| {label} |"))
                 for label in ("FLoRIST noise rule", "FLoRIST tau=0.90"))  # fmt: skip
    assert rule.split("|")[2] == tau.split("|")[2] != " "  # the rule's no-DP column is tau 0.9's cell
    assert (out / "loss_vs_epsilon.png").stat().st_size > 0
    before = (out / "results.json").read_text()
    assert main(args) == 0  # every cell done: nothing trains, the same results
    assert (out / "results.json").read_text() == before
