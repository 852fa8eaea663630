"""A client's local training and each aggregator's protocol, on a tiny random Llama, no network."""

from __future__ import annotations

import pytest
import torch

from florist.aggregation import EnergyThreshold, make_aggregator
from florist.client.local import LocalClient
from florist.client.lora_state import extract, lora_layers
from florist.client.train import TrainSettings
from florist.config.schema import AdapterConfig
from florist.data.records import Example
from florist.errors import ConfigError
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer

DATA = [
    [Example(f"Add {a} and {b}.", str(a + b), category="add") for a in range(3) for b in range(3)],
    [Example(f"Shout {w}.", w.upper(), category="shout") for w in ("cat", "dog", "sun", "sky", "red")],
]
TRAIN = TrainSettings(lr=5e-3, steps=3, batch_size=2, max_length=256)


def _clients(
    method: str,
    ranks: tuple[int, ...] = (4, 2),
    seed: int = 0,
    init: str = "shared",
    warm: bool = False,
    split: str = "balanced",
    warm_from: str = "last",
) -> list[LocalClient]:
    protocol = make_aggregator(method).protocol
    return [
        LocalClient(
            f"c{k}",
            tiny_llama(vocab_size=VOCAB_SIZE),
            tiny_tokenizer(),
            DATA[k],
            AdapterConfig(
                ranks=(r,),
                alpha=2 * r,
                dropout=0.0,
                target_modules=("q_proj", "v_proj"),
                init=init,
                warm_start=warm,
                warm_split=split,
                warm_from=warm_from,
            ),
            TRAIN,
            protocol,
            seed=seed,
            shared_a_rank=max(ranks),
        )
        for k, r in enumerate(ranks)
    ]


def _base_weights(client: LocalClient) -> dict[str, torch.Tensor]:
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_layers(client.model)}


def test_training_lowers_the_loss_and_reports_tokens() -> None:
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    client = LocalClient(
        "c0",
        tiny_llama(vocab_size=VOCAB_SIZE, initializer_range=0.3),  # at 0.02, logits cannot get confident
        tiny_tokenizer(),
        DATA[0],
        AdapterConfig(ranks=(8,), alpha=16, dropout=0.0, target_modules=targets),
        TrainSettings(lr=1e-2, steps=40, batch_size=4, max_length=256),
        make_aggregator("florist").protocol,
        seed=0,
    )
    update, stats = client.fit(round=1)
    assert stats.steps == 40 and stats.tokens > 0
    assert sum(stats.losses[-5:]) / 5 < 0.5 * sum(stats.losses[:5]) / 5, stats.losses
    assert len(update.modules) == 2 * 7
    assert all(f.scaling == pytest.approx(2.0) and f.rank == 8 for f in update.modules.values())


def test_same_seed_gives_bitwise_identical_updates() -> None:
    a, b = _clients("florist")[0].fit(1)[0], _clients("florist")[0].fit(1)[0]
    for name in a.modules:
        assert torch.equal(a.modules[name].B, b.modules[name].B) and torch.equal(
            a.modules[name].A, b.modules[name].A
        )


@pytest.mark.parametrize("method", ["florist", "flora"])
def test_merge_and_restart_moves_every_base_to_base_plus_global(method: str) -> None:
    clients = _clients(method)
    before = _base_weights(clients[0])
    result = make_aggregator(
        method, **({"policy": EnergyThreshold(0.95)} if method == "florist" else {})
    ).aggregate([c.fit(1)[0] for c in clients])
    for c in clients:
        c.receive(result.download(c.client_id), round=1)
        after = _base_weights(c)
        for name, f in result.global_update.items():
            torch.testing.assert_close(after[name], before[name] + f.delta(), rtol=0, atol=1e-6)
        assert all(torch.count_nonzero(f.B) == 0 for f in extract(c.model).values()), "LoRA restarts at B = 0"


@pytest.mark.parametrize("method", ["fedit", "flexlora"])
def test_continue_protocols_load_the_download(method: str) -> None:
    clients = _clients(method)
    result = make_aggregator(method).aggregate([c.fit(1)[0] for c in clients])
    for c in clients:
        c.receive(result.download(c.client_id), round=1)
        for name, f in extract(c.model).items():
            torch.testing.assert_close(
                f.delta(), result.download(c.client_id)[name].delta(), rtol=1e-5, atol=1e-7
            )


def test_ffa_clients_share_a_frozen_a_and_aggregate_exactly() -> None:
    clients = _clients("ffa")
    a0 = {n: f.A for n, f in extract(clients[0].model).items()}
    updates = [c.fit(1)[0] for c in clients]
    for u in updates:
        for name, f in u.modules.items():
            assert torch.equal(f.A, a0[name][: f.rank]), "A must stay the shared, frozen draw"
    result = make_aggregator("ffa").aggregate(updates)
    clients[1].receive(result.download("c1"), round=1)
    for name, f in extract(clients[1].model).items():
        torch.testing.assert_close(f.delta(), result.download("c1")[name].delta(), rtol=1e-5, atol=1e-7)


def test_long_examples_are_truncated_not_dropped() -> None:
    from florist.client.train import encode_all
    from florist.data.tokenize import IGNORE, encode

    tok = tiny_tokenizer()
    full = encode(DATA[0][0], tok, 10_000)
    assert len(full) > 16
    short = encode_all(DATA[0], tok, TrainSettings(max_length=16))
    assert len(short) == len(DATA[0])  # every row kept
    for e in short:
        assert len(e) == 16
        labelled = [x for x in e.labels if x != IGNORE]
        assert labelled and e.input_ids[-len(labelled) :] == labelled  # the response is the tail
    # the prompt keeps its head (bos, instruction) and its tail (the response cue)
    e = short[0]
    n_prompt = e.labels.count(IGNORE)
    assert e.input_ids[:2] == full.input_ids[:2]
    prompt_len = full.labels.count(IGNORE)
    assert e.input_ids[n_prompt - 2 : n_prompt] == full.input_ids[prompt_len - 2 : prompt_len]
    # inputs trained too (the paper's train_on_inputs): cut at the end
    e_in = encode(DATA[0][0], tok, 16, train_on_inputs=True)
    assert e_in.input_ids == full.input_ids[:16] == e_in.labels


def test_bad_training_settings_are_named() -> None:
    with pytest.raises(
        ConfigError, match="give exactly one of train.steps, train.epochs and train.examples, got steps=None"
    ):
        TrainSettings(steps=None)
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        TrainSettings(batch_size=0)
    with pytest.raises(ConfigError, match=r"lora.ranks must be positive integers, got \[0\]"):
        AdapterConfig(ranks=(0,))
    assert TrainSettings(steps=None, epochs=1.5, batch_size=4, grad_accum=2).num_steps(20) == 4
    # the paper's terms: effective batch 32 (4 x 8), 1/8 epoch or 64 examples per round
    eighth = TrainSettings(steps=None, epochs=0.125, batch_size=4, grad_accum=8)
    assert (
        eighth.effective_batch == 32
        and eighth.num_steps(1000) == 4
        and eighth.examples_per_round(1000) == 128
    )
    assert TrainSettings(steps=None, examples=64, batch_size=4, grad_accum=8).num_steps(10**6) == 2
    with pytest.raises(ConfigError, match="exactly one of train.steps, train.epochs and train.examples"):
        TrainSettings(steps=3, examples=64)
    with pytest.raises(ConfigError, match="train.examples must be positive, got 0"):
        TrainSettings(steps=None, examples=0)


@pytest.mark.parametrize(("method", "init", "shared"), [
    ("florist", "shared", True), ("florist", "per_client", False),
    ("fedit", "per_client", True),  # continue protocols start round 1 from one draw whatever init says
    ("flexlora", "shared", True),
])  # fmt: skip
def test_init_policy_decides_whether_round_one_starts_from_one_draw(
    method: str, init: str, shared: bool
) -> None:
    clients = _clients(method, ranks=(4, 2), init=init)
    a0, a1 = extract(clients[0].model), extract(clients[1].model)
    for name in a0:
        assert torch.equal(a0[name].A[:2], a1[name].A) is shared, name  # rank 2 takes the leading rows
        assert torch.count_nonzero(a1[name].B) == 0
    if method == "florist":  # a fresh LoRA each round: the shared draw changes with the round
        result = make_aggregator(method).aggregate([c.fit(1)[0] for c in clients])
        for c in clients:
            c.receive(result.download(c.client_id), round=1)
        b0, b1 = extract(clients[0].model), extract(clients[1].model)
        for name in b0:
            assert torch.equal(b0[name].A[:2], b1[name].A) is shared
            assert not torch.equal(b0[name].A, a0[name].A)


def _effective_weights(client: LocalClient) -> dict[str, torch.Tensor]:
    """W0 + s B A of every adapted module, float64: the function the client computes."""
    out = {}
    for (name, layer), f in zip(lora_layers(client.model), extract(client.model).values(), strict=True):
        out[name] = layer.get_base_layer().weight.detach().double() + f.delta(torch.float64)
    return out


@pytest.mark.parametrize("split", ["balanced", "orthonormal"])
def test_warm_start_keeps_the_model_and_the_server_recovers_what_the_client_changed(split: str) -> None:
    from florist.aggregation.lowrank import warm_parts, without_warm_part

    clients = _clients("florist", ranks=(4, 2), warm=True, split=split)
    result = make_aggregator("florist", policy=EnergyThreshold(1.0)).aggregate([c.fit(1)[0] for c in clients])
    for c in clients:
        c.receive(result.download(c.client_id), round=1)
        merged = _effective_weights(c)  # base + global, LoRA at B = 0
        c._warm_start(c.pending_warm)  # what fit does first
        c.pending_warm = None
        warm = _effective_weights(c)
        for name in merged:  # the model is unchanged (to float32 rounding)
            torch.testing.assert_close(warm[name], merged[name], rtol=0, atol=1e-6)
        assert all(torch.count_nonzero(f.B) > 0 for f in extract(c.model).values()), "the LoRA starts warm"
        if split == "orthonormal":  # A = V^T: unit, orthogonal rows (the global has rank >= r_k here)
            for f in extract(c.model).values():
                torch.testing.assert_close(f.A @ f.A.mT, torch.eye(c.lora.rank), rtol=0, atol=1e-5)
        upload, _ = c.fit(2)
        changed = _effective_weights(c)
        delta = without_warm_part(upload, warm_parts(result.global_update, c.lora.rank))
        for name, f in delta.modules.items():
            torch.testing.assert_close(
                f.delta(torch.float64), changed[name] - merged[name], rtol=0, atol=2e-6
            )


def test_accumulated_warm_start_continues_from_the_best_rank_r_part_of_every_merged_global() -> None:
    from florist.aggregation.lowrank import warm_parts, warm_source, without_warm_part

    clients = _clients("florist", ranks=(4, 2), warm=True, warm_from="accumulated")
    agg = make_aggregator("florist", policy=EnergyThreshold(1.0))
    globals_ = []
    for t in (1, 2):
        result = agg.aggregate([c.fit(t)[0] for c in clients])
        globals_.append(result.global_update)
        for c in clients:
            c.receive(result.download(c.client_id), round=t)
    for c in clients:
        merged = _effective_weights(c)
        c._warm_start(c.pending_warm)
        c.pending_warm = None
        lora = extract(c.model)
        for name, f in lora.items():  # dense reference: rank-r truncation of G_1 + G_2
            total = sum(g[name].delta(torch.float64) for g in globals_)
            U, S, Vh = torch.linalg.svd(total)
            r = c.lora.rank
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            torch.testing.assert_close(f.delta(torch.float64), best, rtol=0, atol=1e-6)
        upload, _ = c.fit(3)
        changed = _effective_weights(c)
        delta = without_warm_part(upload, warm_parts(warm_source(globals_, "accumulated"), c.lora.rank))
        for name, f in delta.modules.items():  # what the server subtracts is what the client started from
            torch.testing.assert_close(
                f.delta(torch.float64), changed[name] - merged[name], rtol=0, atol=2e-6
            )


def test_after_a_warm_round_the_next_merge_lands_on_the_global_weights_bitwise() -> None:
    warm, plain = _clients("florist", warm=True), _clients("florist", warm=False)
    agg = make_aggregator("florist")
    results = []
    for t in (1, 2):
        result = agg.aggregate([c.fit(t)[0] for c in warm])
        results.append(result)
        for c in warm:
            c.receive(result.download(c.client_id), round=t)
    for t, result in enumerate(results, 1):  # the same global updates, merged without any warm split
        plain[0].receive(result.download("c0"), round=t)
    got, want = _base_weights(warm[0]), _base_weights(plain[0])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_client_that_only_syncs_keeps_the_merged_weights_bitwise() -> None:
    clients = _clients("florist", warm=True)
    result = make_aggregator("florist").aggregate([c.fit(1)[0] for c in clients])
    before = _base_weights(clients[0])
    clients[0].receive(result.download("c0"), round=1)
    for name, f in result.global_update.items():  # warm start waits for fit: the base is base + global
        torch.testing.assert_close(
            _base_weights(clients[0])[name], before[name] + f.delta(), rtol=0, atol=1e-6
        )
    assert clients[0].pending_warm is not None


def test_the_data_stream_continues_across_rounds() -> None:
    from florist.client.train import BatchStream

    enc = list(range(10))
    one = BatchStream(enc, 4, seed=3)  # type: ignore[arg-type]
    first = [one.next() for _ in range(5)]  # 20 draws: two epochs
    again = BatchStream(enc, 4, seed=3, start=8)  # type: ignore[arg-type]
    assert [again.next() for _ in range(3)] == first[2:]
    assert sorted([*first[0], *first[1], *first[2][:2]]) == enc  # the first 10 draws are one epoch


def test_fedex_clients_continue_from_the_averages_and_the_server_model_is_fedavg_of_theirs() -> None:
    """FedEx-LoRA (merge and continue): after merging G_1 a client moves its slice of the averages
    back into its LoRA (model unchanged); after round 2 the server's W0 + G_1 + G_2 equals the
    weighted mean of the clients' trained models, exactly (float64 reference)."""
    from dataclasses import replace

    from florist.aggregation.lowrank import leading_columns

    clients = _clients("fedex", ranks=(4, 2))
    w0 = _effective_weights(clients[0])
    agg = make_aggregator("fedex")
    g1 = agg.aggregate([c.fit(1)[0] for c in clients]).global_update
    for c in clients:
        c.receive(g1, round=1)
        c._warm_start(c.pending_warm)  # what fit does first
        c.pending_warm = None
        lora, start = extract(c.model), leading_columns(g1, c.lora.rank)
        for name, f in lora.items():
            torch.testing.assert_close(f.delta(), start[name].delta(), rtol=0, atol=1e-6)
            torch.testing.assert_close(
                _effective_weights(c)[name], w0[name] + g1[name].delta(torch.float64), rtol=0, atol=1e-6
            )
    uploads = [replace(c.fit(2)[0], start=leading_columns(g1, c.lora.rank)) for c in clients]
    result = agg.aggregate(uploads)
    p = {u.client_id: w for u, w in zip(uploads, (9.0, 5.0), strict=True)}  # n_k of DATA[0], DATA[1]
    assert result.weights == pytest.approx({c: w / 14 for c, w in p.items()})
    trained = [_effective_weights(c) for c in clients]
    for name in w0:
        fedavg = sum(result.weights[c.client_id] * t[name] for c, t in zip(clients, trained, strict=True))
        server = w0[name] + g1[name].delta(torch.float64) + result.global_update[name].delta(torch.float64)
        torch.testing.assert_close(server, fedavg, rtol=0, atol=2e-6)


def test_uplink_cut_of_the_change_sends_what_the_client_changed_and_the_server_takes_it_as_is() -> None:
    """uplink_cut = "change": at tau_up = 1 the upload is exactly merged-to-trained (float64 check on the
    dense product); at tau_up < 1 it is the best cut of the change, and the server does not subtract."""
    from florist.config import load_config
    from florist.server.round import round_deltas

    for tau_up in (1.0, 0.6):
        clients = _clients("florist", ranks=(4, 2), warm=True, split="orthonormal")
        for c in clients:
            c.uplink_tau, c.uplink_cut = tau_up, "change"
        agg = make_aggregator("florist", policy=EnergyThreshold(1.0))
        first = [c.fit(1)[0] for c in clients]
        assert not any(c.sends_change for c in clients)  # round 1: no warm part, the adapter is the change
        result = agg.aggregate(first)
        for c in clients:
            c.receive(result.download(c.client_id), round=1)
        merged = [_effective_weights(c) for c in clients]
        uploads = [c.fit(2)[0] for c in clients]
        assert all(c.sends_change for c in clients)
        cfg = load_config(None, ["lora.warm_start=true", f"federation.uplink_tau={tau_up}",
                                 "federation.uplink_cut='change'", "federation.num_clients=2"])  # fmt: skip
        deltas = round_deltas(cfg, uploads, [result], {"c0": 4, "c1": 2})
        assert deltas == uploads  # taken as sent
        for c, before, up in zip(clients, merged, uploads, strict=True):
            after = _effective_weights(c)
            for name, f in up.modules.items():
                change = after[name] - before[name]  # (m, n) float64: what training did this round
                raw = c.raw_upload[name].delta(torch.float64)
                torch.testing.assert_close(raw, change, rtol=0, atol=2e-6)
                got = f.delta(torch.float64)
                if tau_up == 1.0:
                    torch.testing.assert_close(got, change, rtol=0, atol=2e-6)
                else:  # the best rank-q approximation of the change (Eckart-Young), q <= r_k + r_k
                    q = f.rank
                    S = torch.linalg.svdvals(change)
                    assert q <= 2 * c.lora.rank
                    err = float((got - change).norm())
                    assert err == pytest.approx(float(S[q:].norm()), rel=1e-3, abs=1e-6)


def test_flexlora_downloads_fit_the_client_lora_when_uploads_were_cut() -> None:
    """A FlexLoRA client that cut its upload still gets a download of its LoRA's rank (the server knows
    it from the client's config), and it loads into the client's LoRA."""
    from florist.config import load_config
    from florist.server.round import aggregate_round

    clients = _clients("flexlora", ranks=(4, 2))
    for c in clients:
        c.uplink_tau = 0.5
    uploads = [c.fit(1)[0] for c in clients]
    assert any(
        f.rank < c.lora.rank for c, u in zip(clients, uploads, strict=True) for f in u.modules.values()
    )
    cfg = load_config(
        None, ["aggregation.method='flexlora'", "federation.uplink_tau=0.5", "federation.num_clients=2"]
    )
    agg = make_aggregator("flexlora")
    outcome = aggregate_round(cfg, agg, 1, uploads, [], {"c0": 4, "c1": 2})
    assert outcome.result is not None
    for c in clients:
        download = outcome.result.download(c.client_id)
        assert {f.rank for f in download.values()} == {c.lora.rank}
        c.receive(download, round=1)  # loads without a shape error
        c.fit(2)


def test_gradient_checkpointing_trains_the_same_adapter() -> None:
    """Recomputing the activations (train.gradient_checkpointing) gives the same losses and LoRA factors
    as keeping them, dropout included (fp32), and is off again after the round."""
    from dataclasses import replace

    out = []
    for on in (False, True):
        settings = replace(TRAIN, precision="fp32", gradient_checkpointing=on)
        lora = AdapterConfig(ranks=(4,), alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"))
        client = LocalClient("c0", tiny_llama(vocab_size=VOCAB_SIZE), tiny_tokenizer(), DATA[0], lora, settings,
                             make_aggregator("florist").protocol, seed=0)  # fmt: skip
        inner = client.model.base_model.model
        during: list[bool] = []
        update, stats = client.fit(
            1, on_step=lambda _, d=during, m=inner: d.append(m.is_gradient_checkpointing)
        )
        out.append((update, stats.losses))
        assert set(during) == {on} and not inner.is_gradient_checkpointing
    (plain, plain_losses), (ckpt, ckpt_losses) = out
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, f in plain.modules.items():
        torch.testing.assert_close(ckpt.modules[name].B, f.B, rtol=1e-4, atol=1e-6)
