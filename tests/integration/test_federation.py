"""Flower simulation on a tiny random Llama: 3 clients, 2 rounds, heterogeneous ranks, every method.

For the merge protocols (florist, flora, fedex) the test recomputes each round's aggregate offline from the
client uploads the run saved, and checks the global adapters, the cumulative adapter and every
client's merged weights against it. Client 1 skips round 2, so it must catch up exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from florist.aggregation.lowrank import leading_columns
from florist.config import FloristConfig, load_config
from florist.flower.simulation import run_simulation
from florist.lora.peft_io import read_adapter
from tests.flower_helpers import save_tiny_model, tiny_run_config
from tests.helpers import assert_product_close

pytestmark = pytest.mark.integration
SCHEDULE = "federation.participation=[[0, 1], [0, 2]]"  # client 1 skips round 2, client 2 joins late


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


RANKS = (8, 4, 2)  # tiny_run_config's client ranks


def offline(cfg: FloristConfig, round_dir: Path, previous: Path | None = None) -> dict[str, torch.Tensor]:
    """Aggregate the round's saved client uploads with the same aggregator: dense B @ A per module.
    FedEx-LoRA clients continued from their slice of the previous global update (``previous``)."""
    clients = sorted((round_dir / "clients").iterdir())
    updates = []
    for d in clients:
        n = json.loads((d / "florist.json").read_text())["num_examples"]
        update = read_adapter(d).to_update(d.name, n)
        if previous is not None and cfg.aggregation.method == "fedex":
            rank = RANKS[int(d.name.removeprefix("client-"))]
            update = replace(update, start=leading_columns(read_adapter(previous).modules, rank))
        updates.append(update)
    agg = cfg.aggregator()
    result = agg.aggregate(updates)
    return {name: f.delta(torch.float64) for name, f in result.global_update.items()}


def adapter_deltas(path: Path) -> dict[str, torch.Tensor]:
    return {name: f.delta(torch.float64) for name, f in read_adapter(path).modules.items()}


@pytest.mark.parametrize("method", ["florist", "flora", "fedex"])
def test_merge_methods_match_offline_aggregation_and_clients_catch_up(
    method: str, model_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_run_config(model_dir, tmp_path, method, f"aggregation.method={method!r}", SCHEDULE)
    summary = run_simulation(cfg)
    run = Path(summary["run_dir"])
    total: dict[str, torch.Tensor] = {}
    for t in (1, 2):
        previous = run / "rounds" / f"round-{t - 1:03d}" / "adapter" if t > 1 else None
        want = offline(cfg, run / "rounds" / f"round-{t:03d}", previous)
        got = adapter_deltas(run / "rounds" / f"round-{t:03d}" / "adapter")
        assert sorted(got) == sorted(want)
        for name in want:
            assert_product_close(got[name], want[name], rtol=1e-4)
            total[name] = total.get(name, 0) + want[name]
    final = adapter_deltas(run / "adapter")  # the cumulative adapter: base + it = the global model
    for name in total:
        assert_product_close(final[name], total[name], rtol=1e-4)
    sync = summary["sync"]
    assert sorted(sync["digests"]) == ["client-000", "client-001", "client-002"]
    assert set(sync["digests"].values()) == {sync["server_digest"]}, "a client's merged weights differ"
    assert summary["bytes_catchup"] > 0  # client 1 received round 1's update late, and it was counted
    assert_uploads_counted(run, method)


def assert_uploads_counted(run: Path, method: str, wire_bytes: int = 4) -> None:
    """Every round's ``bytes_up`` is what its saved uploads hold (B only for FFA-LoRA and FedSVD)."""
    for r in records(run)[1:]:
        clients = sorted((run / "rounds" / f"round-{r['round']:03d}" / "clients").iterdir())
        assert [c.name for c in clients] == r["clients"], (method, r["round"])
        sends_a = method not in ("ffa", "fedsvd")  # their uploads carry B only
        want = sum(
            f.B.numel() * wire_bytes + (f.A.numel() * wire_bytes if sends_a else 0)
            for c in clients
            for f in read_adapter(c).modules.values()
        )
        assert r["bytes_up"] == want, (method, r["round"])


def test_every_method_runs_and_accounts_its_bytes(model_dir: Path, tmp_path: Path) -> None:
    """The continue-protocol methods without a Flower test of their own (FLoRIST, FLoRA, FedEx-LoRA and
    FedSVD have theirs, which check their bytes with ``assert_uploads_counted`` too)."""
    for method in ("fedit", "flexlora", "ffa", "rblora"):
        cfg = tiny_run_config(model_dir, tmp_path, method, f"aggregation.method={method!r}")
        summary = run_simulation(cfg)
        run = Path(summary["run_dir"])
        rows = records(run)
        assert [r["round"] for r in rows] == [0, 1, 2], method
        assert "exact_match" in rows[0]["eval"] and "heldout_loss" in rows[-1]["eval"]
        assert_uploads_counted(run, method)
        for r in rows[1:]:
            clients = sorted((run / "rounds" / f"round-{r['round']:03d}" / "clients").iterdir())
            assert [c.name for c in clients] == ["client-000", "client-001", "client-002"]
            assert [read_adapter(c).modules[next(iter(read_adapter(c).modules))].rank for c in clients] == [
                8,
                4,
                2,
            ]
        assert rows[2]["bytes_down"] > 0 and rows[1]["bytes_down"] == 0
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert load_config(run / "config.toml") == cfg  # the resolved config repeats the run


def test_fedsvd_clients_train_b_against_the_servers_latest_a_and_catch_up(
    model_dir: Path, tmp_path: Path
) -> None:
    """FedSVD under Flower, client 1 skipping round 2 and client 2 joining late: every upload's A is
    the A the server sent last (the seeded draw in round 1), each round's global update equals the
    offline aggregate of the saved uploads with orthonormal rows in A, and the run's adapter is the
    last global update."""
    cfg = tiny_run_config(model_dir, tmp_path, "fedsvd", "aggregation.method='fedsvd'", SCHEDULE,
                          "federation.wire_dtype='bfloat16'")  # fmt: skip
    run = Path(run_simulation(cfg)["run_dir"])
    sent: dict[str, torch.Tensor] | None = None
    for t in (1, 2):
        round_dir = run / "rounds" / f"round-{t:03d}"
        for d in sorted((round_dir / "clients").iterdir()):
            rank = RANKS[int(d.name.removeprefix("client-"))]
            for name, f in read_adapter(d).modules.items():
                if sent is None:  # round 1: the one seeded draw (the leading rows of the largest)
                    first = read_adapter(sorted((round_dir / "clients").iterdir())[0]).modules[name].A
                    assert torch.equal(f.A, first[:rank])
                else:
                    assert torch.equal(f.A, sent[name][:rank].to(f.A.dtype)), (t, d.name, name)
        want = offline(cfg, round_dir)
        glob = read_adapter(round_dir / "adapter").modules
        for name, g in glob.items():
            assert_product_close(g.delta(torch.float64), want[name], rtol=2**-6)  # a bf16 download
            A = g.A.to(torch.float64)
            assert float((A @ A.T - torch.eye(A.shape[0], dtype=torch.float64)).abs().max()) < 2e-2
        sent = {name: g.A for name, g in glob.items()}
    final = adapter_deltas(run / "adapter")
    for name, delta in adapter_deltas(run / "rounds" / "round-002" / "adapter").items():
        torch.testing.assert_close(final[name], delta)
    assert_uploads_counted(run, "fedsvd", wire_bytes=2)  # B only, bf16


def test_protocol_options_under_flower_keep_clients_and_server_in_step(
    model_dir: Path, tmp_path: Path
) -> None:
    """Warm start, uplink thresholding and a bf16 wire together, with a client that skips a round:
    the run ends with every client holding the server's weights bitwise, uploads travel as bf16 and
    at most the client's rank, and each round's global update equals the offline aggregate of the
    round deltas the run saved (the uploads less their warm parts)."""
    opts = ("lora.warm_start=true", "federation.uplink_tau=0.9", "federation.wire_dtype='bfloat16'")
    cfg = tiny_run_config(model_dir, tmp_path, "options", "aggregation.method='florist'", "aggregation.tau=1.0",
                          "federation.rounds=3", "federation.participation=[[0, 1], [0, 2], [0, 1, 2]]", *opts)  # fmt: skip
    summary = run_simulation(cfg)
    run = Path(summary["run_dir"])
    sync = summary["sync"]
    assert set(sync["digests"].values()) == {sync["server_digest"]}, "a client's merged weights differ"
    rows = records(run)
    for r in rows[1:]:
        round_dir = run / "rounds" / f"round-{r['round']:03d}"
        deltas = {d.name: read_adapter(d) for d in sorted((round_dir / "clients").iterdir())}
        warm = r["round"] > 1
        for cid, adapter in deltas.items():  # saved: the round deltas (upload ranks + warm part when warm)
            rank = {"client-000": 8, "client-001": 4, "client-002": 2}[cid]
            assert all(f.rank <= (2 * rank if warm else rank) for f in adapter.modules.values())
        want = offline(cfg, round_dir)
        got = adapter_deltas(round_dir / "adapter")
        for name in want:  # the download is bf16-rounded: within bf16's relative rounding
            rel = float((got[name] - want[name]).norm() / want[name].norm())
            assert rel < 2**-6, (r["round"], name, rel)
    # round 1 (no warm part yet): the saved uploads are what was sent, 2 bytes per element
    sent = [read_adapter(d) for d in sorted((run / "rounds" / "round-001" / "clients").iterdir())]
    full = {"client-000": 8, "client-001": 4}
    assert rows[1]["bytes_up"] == sum(
        f.A.numel() * 2 + f.B.numel() * 2 for a in sent for f in a.modules.values()
    )
    assert rows[1]["bytes_up"] < sum(r * sum(f.A.shape[1] + f.B.shape[0] for f in sent[0].modules.values()) * 2
                                     for r in full.values())  # fmt: skip  # tau_up = 0.9 cut some rank


def test_demo_configuration_under_flower_carries_the_cut_and_keeps_clients_in_step(
    model_dir: Path, tmp_path: Path
) -> None:
    """``florist demo``'s FLoRIST (tau 0.9, warm start from the accumulated update, error feedback,
    uplink thresholding, bf16 wire) under Flower, a client skipping a round: each round's global
    update equals the offline aggregate of the round deltas the run saved *plus the tail the previous
    round's cut left out*, every client ends on the server's weights bitwise, and the carried tail is
    large enough that a runtime which dropped it would fail the comparison."""
    opts = ("lora.warm_start=true", "lora.warm_from='accumulated'", "aggregation.error_feedback=true",
            "federation.uplink_tau=0.9", "federation.wire_dtype='bfloat16'")  # fmt: skip
    cfg = tiny_run_config(model_dir, tmp_path, "demo-options", "aggregation.method='florist'", "aggregation.tau=0.9",
                          "federation.rounds=3", "federation.participation=[[0, 1], [0, 2], [0, 1, 2]]", *opts)  # fmt: skip
    summary = run_simulation(cfg)
    run = Path(summary["run_dir"])
    sync = summary["sync"]
    assert set(sync["digests"].values()) == {sync["server_digest"]}, "a client's merged weights differ"
    carry, carried = None, 0.0
    for r in records(run)[1:]:
        round_dir = run / "rounds" / f"round-{r['round']:03d}"
        updates = []
        for d in sorted((round_dir / "clients").iterdir()):
            n = json.loads((d / "florist.json").read_text())["num_examples"]
            updates.append(read_adapter(d).to_update(d.name, n))
        result = replace(cfg.aggregator(), carry=carry).aggregate(updates)
        without = cfg.aggregator().aggregate(updates).global_update
        got = adapter_deltas(round_dir / "adapter")
        for name, f in result.global_update.items():  # the download is bf16-rounded
            want = f.delta(torch.float64)
            rel = float((got[name] - want).norm() / want.norm())
            assert rel < 2**-6, (r["round"], name, rel)
            if carry is not None:
                gap = without[name].delta(torch.float64) - want
                carried = max(carried, float(gap.norm() / want.norm()))
        assert result.residual, f"round {r['round']}: tau 0.9 cut nothing, so nothing is carried"
        carry = result.residual
    assert carried > 2**-4, carried  # the tail moved some round's update far beyond bf16 rounding


def test_fedsb_round_zero_basis_once_cores_after_and_resume(model_dir: Path, tmp_path: Path) -> None:
    """Fed-SB under Flower, client 1 skipping round 2 and client 2 joining late: round 0's gradients
    are counted in round 1, the basis goes to each client once (client 2 gets it in round 2), every
    other message carries r x r cores only; each round's global update is B (sum p_k R_k) A, the
    offline aggregate of the saved uploads; a run resumed after round 1 ends with the same adapter."""
    over = ["aggregation.method='fedsb'", "aggregation.tau=none", SCHEDULE, "federation.wire_dtype='bfloat16'",
            "lora.ranks=[4]", "aggregation.init_samples=6", "run.checkpoint_keep=5"]  # fmt: skip
    cfg = tiny_run_config(model_dir, tmp_path, "fedsb", *over)
    summary = run_simulation(cfg)
    run = Path(summary["run_dir"])
    rows = {r["round"]: r for r in records(run)}
    shapes = [(32, 32), (16, 32)] * 2  # tiny llama: q, v in two layers
    core, basis = len(shapes) * 16 * 2, sum(4 * (m + n) for m, n in shapes) * 2  # bf16 bytes
    assert rows[1]["init_bytes_up"] == 3 * sum(m * n for m, n in shapes) * 2
    assert rows[1]["bytes_up"] == rows[1]["init_bytes_up"] + 2 * core
    assert rows[1]["bytes_down"] == 2 * (core + basis)  # clients 0 and 1 get the basis with R_0
    assert rows[2]["bytes_up"] == 2 * core and rows[2]["bytes_down"] == core + (core + basis)
    for t in (1, 2):
        round_dir = run / "rounds" / f"round-{t:03d}"
        ups = {d.name: read_adapter(d).modules for d in sorted((round_dir / "clients").iterdir())}
        sizes = {d.name: json.loads((d / "florist.json").read_text())["num_examples"]
                 for d in (round_dir / "clients").iterdir()}  # fmt: skip
        total = sum(sizes.values())
        for name, g in read_adapter(round_dir / "adapter").modules.items():
            want = sum(sizes[c] / total * m[name].delta(torch.float64) for c, m in ups.items())
            assert_product_close(g.delta(torch.float64), want, rtol=2**-6)  # a bf16 core
            bases = {c: m[name].A for c, m in ups.items()}
            assert all(torch.equal(a, next(iter(bases.values()))) for a in bases.values())  # one basis
    final = adapter_deltas(run / "adapter")
    for name, delta in adapter_deltas(run / "rounds" / "round-002" / "adapter").items():
        torch.testing.assert_close(final[name], delta)
    # resume after round 1 (the round-2 checkpoint removed): fresh nodes get the basis again
    for path in (run / "checkpoints").glob("round-002.pt*"):
        path.unlink()
    resumed = run_simulation(replace(cfg, run=replace(cfg.run, resume=True)))
    for name, delta in adapter_deltas(Path(resumed["adapter"])).items():
        torch.testing.assert_close(delta, final[name])
    assert {r["round"]: r for r in records(run)}[2]["bytes_down"] == 2 * (core + basis)


def test_client_level_dp_under_flower_reports_epsilon_per_round(model_dir: Path, tmp_path: Path) -> None:
    """privacy.mode = 'client' with FLoRIST's noise rule: the run trains, every round's line and the
    summary carry the epsilon the accountant gives for the rounds so far."""
    from florist.privacy.accountant import Accountant

    cfg = tiny_run_config(model_dir, tmp_path, "dp", "privacy.mode='client'", "privacy.noise_multiplier=2.0",
                          "privacy.clip=0.5", "aggregation.rank_policy='noise'", "aggregation.tau=none",
                          "lora.warm_start=false")  # fmt: skip
    summary = run_simulation(cfg)
    rows = {r["round"]: r for r in records(Path(summary["run_dir"]))}
    acc = Accountant(2.0, 1.0, 1e-5)
    assert [rows[t]["epsilon"] for t in (1, 2)] == [acc.epsilon(1), acc.epsilon(2)]
    assert summary["privacy"] == {"mode": "client", "epsilon": acc.epsilon(2), "delta": 1e-5,
                                  "noise_multiplier": 2.0, "clip": 0.5, "sample_rate": 1.0}  # fmt: skip
    assert rows[2]["aggregated"] == ["dp-noised-mean"]  # the aggregator saw the noised mean only


def test_client_level_dp_under_flower_samples_poisson_and_survives_an_empty_round(
    model_dir: Path, tmp_path: Path
) -> None:
    """fraction 0.5 under client-level DP: each client in a round with probability 0.5 (noise seed 5:
    nobody in round 1, clients 1 and 2 in round 2). The empty round releases the noise alone (as the
    accounted mechanism does; a skipped round would tell the sample was empty) and the run goes on;
    both rounds are accounted at rate 0.5."""
    from florist.privacy.accountant import Accountant

    cfg = tiny_run_config(model_dir, tmp_path, "dp-poisson", "privacy.mode='client'", "privacy.noise_multiplier=2.0",
                          "privacy.noise_seed=5", "federation.fraction=0.5", "aggregation.rank_policy='noise'",
                          "aggregation.tau=none", "lora.warm_start=false")  # fmt: skip
    summary = run_simulation(cfg)
    rows = {r["round"]: r for r in records(Path(summary["run_dir"]))}
    assert (
        rows[1]["clients"] == []
        and not rows[1].get("skipped")
        and rows[1]["aggregated"] == ["dp-noised-mean"]
    )
    assert sorted(rows[2]["clients"]) == ["client-001", "client-002"] and rows[2]["aggregated"] == [
        "dp-noised-mean"
    ]
    acc = Accountant(2.0, 0.5, 1e-5)
    assert [rows[t]["epsilon"] for t in (1, 2)] == [acc.epsilon(1), acc.epsilon(2)]
    assert summary["privacy"]["sample_rate"] == 0.5


def test_dp_sgd_clients_under_flower_report_their_epsilon(model_dir: Path, tmp_path: Path) -> None:
    """privacy.mode = 'dp-sgd' with FedIT (any method: the server only post-processes): every client's
    reply carries the epsilon its plan gives after the round."""
    cfg = tiny_run_config(model_dir, tmp_path, "dpsgd", "privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0",
                          "privacy.delta=1e-2", "aggregation.method='fedit'", "aggregation.tau=none",
                          "lora.warm_start=false")  # fmt: skip
    summary = run_simulation(cfg)
    assert summary["sync"]["clients_match_server"] is None  # FedIT merges nothing: nothing to compare
    rows = {r["round"]: r for r in records(Path(summary["run_dir"]))}
    for t in (1, 2):
        eps = [m["epsilon"] for m in rows[t]["client_metrics"].values()]
        assert len(eps) == 3 and all(0 < e < 100 for e in eps)
    assert all(rows[2]["client_metrics"][c]["epsilon"] > rows[1]["client_metrics"][c]["epsilon"]
               for c in rows[1]["client_metrics"])  # fmt: skip
    # what depends on the secretly sampled rows without noise stays on the client
    for m in rows[1]["client_metrics"].values():
        assert not {"train_loss", "tokens", "label_tokens", "train_seconds"} & set(m), m
    assert rows[1]["train_loss"] != rows[1]["train_loss"]  # nan: nothing to average


def test_ffa_under_client_level_dp_trains_from_the_noised_mean(model_dir: Path, tmp_path: Path) -> None:
    """FFA-LoRA with client-level DP: each round's global B is the start plus the noised mean of the
    clients' clipped B changes; every round is aggregated from that one update."""
    cfg = tiny_run_config(model_dir, tmp_path, "dp-ffa", "privacy.mode='client'", "privacy.noise_multiplier=1.0",
                          "privacy.clip=0.1", "aggregation.method='ffa'", "aggregation.tau=none", "lora.ranks=[4]",
                          "lora.warm_start=false")  # fmt: skip
    summary = run_simulation(cfg)
    rows = {r["round"]: r for r in records(Path(summary["run_dir"]))}
    assert [rows[t]["aggregated"] for t in (1, 2)] == [["dp-noised-mean"]] * 2
    assert summary["privacy"]["epsilon"] == rows[2]["epsilon"] > rows[1]["epsilon"] > 0


def test_chat_data_trains_through_the_models_chat_template(tmp_path: Path) -> None:
    """A ``messages`` file and ``data.template = 'chat'`` on a tiny model whose tokenizer has a chat
    template: the run trains and scores, and the adapter says which template it trained on."""
    from tests.unit.test_chat_data import ROW, chat_tokenizer

    model = save_tiny_model(tmp_path / "tiny-chat")
    chat_tokenizer().save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(ROW | {"category": f"c{i % 3}"}) for i in range(30)) + "\n")
    cfg = tiny_run_config(model, tmp_path, "chat", f"data.source={str(data)!r}", "data.template='chat'",
                          "data.split='iid'", "eval.exact_match=false")  # fmt: skip
    summary = run_simulation(cfg)
    assert (
        summary["rounds"] == 2
        and summary["eval_after"]["heldout_loss"] < summary["eval_before"]["heldout_loss"]
    )
    assert json.loads((Path(summary["adapter"]) / "florist_prompt.json").read_text()) == {"template": "chat"}
    assert json.loads((Path(summary["adapter"]) / "florist_base.json").read_text()) == {"model": str(model)}
    assert read_adapter(summary["adapter"]).base_model_name_or_path == str(model)  # a user's model: as given


def test_fedit_on_nf4_clients_under_flower(model_dir: Path, tmp_path: Path) -> None:
    """Clients on a 4-bit NF4 base (model.quantization) train and upload under Flower; the server
    scores the adapter on the full-precision base, as QLoRA adapters are served."""
    pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (make install has it)")
    cfg = tiny_run_config(model_dir, tmp_path, "nf4", "model.quantization='nf4'", "aggregation.method='fedit'",
                          "aggregation.tau=none", "lora.warm_start=false")  # fmt: skip
    summary = run_simulation(cfg)
    assert summary["rounds"] == 2
    assert summary["eval_after"]["heldout_loss"] < summary["eval_before"]["heldout_loss"]


def test_florist_on_nf4_clients_holds_the_global_updates_beside_the_base(
    model_dir: Path, tmp_path: Path
) -> None:
    """A merge method on a 4-bit base: clients hold the merged updates as a frozen adapter under a
    rank cap (warm start on), their digests equal the server's, and the run's adapter is that adapter."""
    pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (make install has it)")
    cfg = tiny_run_config(model_dir, tmp_path, "nf4-florist", "model.quantization='nf4'", "aggregation.method='florist'",
                          "aggregation.tau=0.9", "lora.warm_start=true", "model.global_adapter_max_rank=5")  # fmt: skip
    summary = run_simulation(cfg)
    assert summary["rounds"] == 2 and summary["sync"]["clients_match_server"]
    assert len(set(summary["sync"]["digests"].values())) == 1 and len(summary["sync"]["digests"]) == 3
    assert summary["eval_after"]["heldout_loss"] < summary["eval_before"]["heldout_loss"]
    adapter = Path(summary["adapter"])
    assert json.loads((adapter / "florist_base.json").read_text()) == {
        "model": str(model_dir),
        "quantization": "nf4",
    }
    assert max(f.rank for f in read_adapter(adapter).modules.values()) <= 5


def test_a_failure_on_the_nodes_reaches_the_console_as_one_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub data set the nodes cannot load (the hub is off): ``florist run`` ends with one error line
    naming the node and its client, and no node's traceback reaches the console."""
    from florist.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["run", "demo", f"model.name={str(model_dir)!r}", f"run.dir={str(tmp_path / 'runs')!r}",
            "federation.num_clients=2", "lora.ranks=[4]", "data.source='nobody-here/no-such-dataset'",
            "run.progress=false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("florist run: error: node ") and "failed to start: client-00" in last, err[-3000:]
    assert "no-such-dataset" in last
    assert "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "runs").exists()  # the server stopped before it made the run directory
