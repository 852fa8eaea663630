"""The federation's one home of state (``server.federation.Server``) and its checkpoint.

What client k downloads (catch-up included), who holds what after a round, a failed round that
changes nothing, and a checkpoint that saves the state and restores it: the server's model and the
downloads after a restore equal those of the server that never stopped. Config changes between a
checkpoint and a resume are named; keys added since, at their defaults, are accepted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from florist.config import FloristConfig, load_config
from florist.errors import ConfigError
from florist.lora import ClientUpdate
from florist.server import checkpoint
from florist.server.federation import Member, Server
from tests.helpers import make_updates

N, RANK = 3, 4


def config(*overrides: str) -> FloristConfig:
    base = [f"federation.num_clients={N}", f"lora.ranks=[{RANK}]"]
    return load_config(None, [*base, *overrides])


def members() -> list[Member]:
    return [Member(f"client-{k}", k, RANK) for k in range(N)]


def uploads(round: int, who: list[int]) -> list[ClientUpdate]:
    every = make_updates([RANK] * N, seed=round)
    return [every[k] for k in who]


def products(modules: dict) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    return {name: f.delta(torch.float64) for name, f in modules.items()}


def test_merge_protocol_catch_up_is_every_round_since_the_last_one_held() -> None:
    cfg = config("aggregation.tau=1.0")
    server = Server(cfg, cfg.aggregator(), members())
    assert server.owed("client-0") == {}
    server.round(1, uploads(1, [0, 1, 2]))
    server.round(2, uploads(2, [0, 1]))  # client-2 sat out round 2
    server.round(3, uploads(3, [0, 1]))
    assert sorted(server.owed("client-0")) == [3]  # trained in 3, so it holds 1 and 2
    assert sorted(server.owed("client-2")) == [1, 2, 3]  # trained in round 1 only, from the base
    assert server.state.synced == {"client-0": 2, "client-1": 2, "client-2": 0}
    assert server.merged_before(3) == [1, 2]
    # the whole update is every round's product, summed
    want = {
        n: sum(products(r.global_update)[n] for _, r in server.history)
        for n in products(server.latest().global_update)
    }
    got = products(server.final_adapter())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_continue_protocol_downloads_the_latest_adapter_only() -> None:
    cfg = config("aggregation.method=fedit")
    server = Server(cfg, cfg.aggregator(), members())
    server.round(1, uploads(1, [0, 1, 2]))
    server.round(2, uploads(2, [0, 2]))
    assert sorted(server.owed("client-1")) == [2]
    assert server.held_lacking("client-1", ()) == {}
    assert set(products(server.final_adapter())) == set(products(server.latest().global_update))


def test_a_round_without_a_result_changes_nothing_but_the_skip_streak() -> None:
    cfg = config("federation.min_replies=2")
    server = Server(cfg, cfg.aggregator(), members())
    server.round(1, uploads(1, [0, 1]))
    before = (list(server.history), dict(server.state.synced))
    bad = uploads(2, [0, 1])
    for u in bad:
        for f in u.modules.values():
            f.B.fill_(float("inf"))
    outcome = server.round(2, bad)
    assert outcome.result is None and server.last is outcome
    assert (server.history, server.state.synced) == before
    assert server.skip(2, "test") == 1 and server.skip(3, "test") == 2
    server.round(4, uploads(4, [0, 1]))
    assert server.state.skipped_streak == 0


def test_participants_follow_the_schedule_or_a_seeded_sample() -> None:
    cfg = config("federation.participation=[[0, 2], [1]]", "federation.rounds=2")
    server = Server(cfg, cfg.aggregator(), members())
    assert [m.client_id for m in server.participants(1)] == ["client-0", "client-2"]
    assert [m.client_id for m in server.participants(2)] == ["client-1"]
    sampled = config("federation.fraction=0.5")
    one, two = (Server(sampled, sampled.aggregator(), members()) for _ in range(2))
    assert [one.participants(t) for t in range(1, 6)] == [two.participants(t) for t in range(1, 6)]
    assert all(len(one.participants(t)) == 2 for t in range(1, 6))  # round half up of 1.5


def test_a_restored_server_owes_and_holds_what_the_one_that_never_stopped_does(tmp_path: Path) -> None:
    cfg = config()
    live = Server(cfg, cfg.aggregator(), members())
    live.round(1, uploads(1, [0, 1, 2]))
    live.round(2, uploads(2, [1, 2]))
    live.state.round = 2
    live.state.records.append({"round": 2})
    checkpoint.save(tmp_path, live.state, cfg, keep=2)
    back = Server(cfg, cfg.aggregator(), members())
    back.restore(checkpoint.load_latest(tmp_path, cfg, force=False))
    assert back.state.synced == live.state.synced and back.state.records == [{"round": 2}]
    for who in ("client-0", "client-1"):
        assert sorted(back.owed(who)) == sorted(live.owed(who))
        for t, update in back.owed(who).items():
            for name, want in products(live.owed(who)[t]).items():
                torch.testing.assert_close(products(update)[name], want)
    # a node that restarted holding nothing gets back what the checkpoint says it held
    assert sorted(back.held_lacking("client-1", ())) == [1]
    assert back.held_lacking("client-1", (1,)) == {}


def _saved(tmp_path: Path, cfg: FloristConfig, drop: str | None = None) -> dict:  # type: ignore[type-arg]
    """A checkpoint of ``cfg`` as an older florist without the key ``drop`` would have written it."""
    checkpoint.save(tmp_path, checkpoint.ServerState(round=0), cfg, keep=1)
    payload = checkpoint.read(checkpoint.checkpoints(tmp_path)[-1])
    if drop is not None:
        tree = json.loads(payload["config"])
        section, key = drop.split(".")
        del tree[section][key]
        payload["config"] = json.dumps(tree)
        payload["config_hash"] = hashlib.sha256(
            json.dumps(checkpoint._hashed(tree), sort_keys=True).encode()
        ).hexdigest()
    return payload


def test_resume_names_changed_keys_and_accepts_keys_added_at_their_default(tmp_path: Path) -> None:
    cfg = config()
    checkpoint.check_config(_saved(tmp_path / "a", cfg), cfg, force=False)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 -> 0\.02"):
        checkpoint.check_config(
            _saved(tmp_path / "b", config("train.lr=0.01")), config("train.lr=0.02"), False
        )
    # written before federation.max_client_weight existed; resumed at its default: the same run
    checkpoint.check_config(_saved(tmp_path / "c", cfg, drop="federation.max_client_weight"), cfg, False)
    # ... but set to something else it is a change, and is named
    other = config("federation.max_client_weight=0.5")
    old = _saved(tmp_path / "d", other, drop="federation.max_client_weight")
    with pytest.raises(ConfigError, match=r"federation\.max_client_weight: None -> 0\.5"):
        checkpoint.check_config(old, other, force=False)


def test_a_forced_resume_under_dp_may_not_change_what_the_guarantee_was_computed_for(tmp_path: Path) -> None:
    dp = ("privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3")
    saved = _saved(tmp_path / "a", config(*dp, "federation.rounds=3"))
    with pytest.raises(ConfigError, match=r"federation\.rounds: 3 -> 5.*start a new run"):
        checkpoint.check_config(saved, config(*dp, "federation.rounds=5"), force=True)
    with pytest.raises(ConfigError, match=r"privacy\.mode: 'client' -> 'none'"):  # switching DP off
        checkpoint.check_config(saved, config("federation.rounds=3"), force=True)
    # what releases nothing may still change, and without DP --force accepts anything
    checkpoint.check_config(saved, config(*dp, "federation.rounds=3", "eval.batch_size=3"), force=True)
    plain = _saved(tmp_path / "b", config("federation.rounds=3"))
    checkpoint.check_config(plain, config("federation.rounds=5"), force=True)


def test_a_private_run_does_not_fall_back_over_a_corrupt_checkpoint(tmp_path: Path) -> None:
    """Rounds after the older checkpoint were released; running them again is unaccounted privacy."""
    for dp in ((), ("privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3")):
        cfg, folder = config(*dp), tmp_path / str(len(dp))
        for t in (1, 2):
            checkpoint.save(folder, checkpoint.ServerState(round=t), cfg, keep=2)
        latest = checkpoint.checkpoints(folder)[-1]
        latest.write_bytes(latest.read_bytes()[:-7] + b"corrupt")
        if not dp:
            assert checkpoint.load_latest(folder, cfg, force=False).round == 1  # falls back
        else:
            with pytest.raises(checkpoint.CheckpointError, match="cannot fall back to round-001.pt"):
                checkpoint.load_latest(folder, cfg, force=False)
