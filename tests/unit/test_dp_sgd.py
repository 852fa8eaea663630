"""DP-SGD on a client: Opacus's per-example gradients of the LoRA parameters, clipped and noised, against
a hand computation on a tiny LoRA Llama; the client's plan and epsilon; the refusals."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from florist.client.lm_loss import per_example_loss
from florist.client.local import LocalClient
from florist.client.lora_state import extract
from florist.config.schema import AdapterConfig, PrivacyConfig
from florist.data.tokenize import collate
from florist.errors import ConfigError
from florist.privacy.accountant import Accountant
from florist.privacy.client_level import noise_generator
from florist.privacy.sample_level import clipped_sum, noised_step, plan, poisson_rows
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer
from tests.unit.test_local_client import DATA, TRAIN

DP = PrivacyConfig(mode="dp-sgd", max_grad_norm=0.05, noise_multiplier=0.0, noise_seed=1)


def _client(privacy: PrivacyConfig = DP) -> LocalClient:
    lora = AdapterConfig(ranks=(4,), alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    return LocalClient("c0", tiny_llama(vocab_size=VOCAB_SIZE), tiny_tokenizer(), DATA[0], lora, TRAIN,
                       _protocol(), seed=0, privacy=privacy, rounds=2)  # fmt: skip


def _protocol():  # type: ignore[no-untyped-def]
    from florist.aggregation import make_aggregator

    return make_aggregator("florist").protocol


def _private_step(params: list[torch.nn.Parameter], expected: float, clip: float, sigma: float,
                  generator: torch.Generator) -> tuple[int, int]:  # fmt: skip
    """One micro-batch's clipped sum, then the step's noise: what a DP-SGD client does per step."""
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    b, clipped = clipped_sum(params, clip, total)
    noised_step(params, total, expected, clip, sigma, generator)
    return b, clipped


def test_clipped_noised_gradient_equals_the_hand_computed_one() -> None:
    """Opacus's per-example gradients, clipped to C and summed, over the expected batch: the same as
    backpropagating each example alone, clipping and summing by hand (float64-free: to 1e-5)."""
    client = _client()
    for f in client.model.parameters():  # a non-zero B, so every LoRA parameter has a gradient
        if f.requires_grad and f.ndim == 2 and float(f.abs().max()) == 0:
            torch.nn.init.normal_(f, std=0.05)
    params = [p for p in client.model.parameters() if p.requires_grad]
    rows = client.encoded[:3]
    batch = collate(rows, client.pad_id)
    hand = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(3):
        client.model.zero_grad()
        per_example_loss(client.model, collate([rows[i]], client.pad_id)).backward()
        grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))  # type: ignore[arg-type]
        norms.append(float(norm))
        for h, g in zip(hand, grads, strict=True):
            h += g * min(1.0, 0.05 / (float(norm) + 1e-6))
    assert max(norms) > 0.05  # the bound bites
    client.model.zero_grad()
    wrapped = GradSampleModule(client.model, loss_reduction="mean")
    per_example_loss(wrapped, batch).backward()
    b, clipped = _private_step(params, 4.0, 0.05, 0.0, noise_generator(0, 0))
    wrapped._close()
    assert b == 3 and clipped > 0
    for p, h in zip(params, hand, strict=True):
        torch.testing.assert_close(p.grad, h / 4.0, rtol=1e-4, atol=1e-7)
    # with noise: the gradient moves by N(0, (sigma C)^2) / expected batch, from the given generator
    wrapped = GradSampleModule(client.model, loss_reduction="mean")
    per_example_loss(wrapped, batch).backward()
    _private_step(params, 4.0, 0.05, 2.0, noise_generator(5, 0))
    wrapped._close()
    noise = torch.cat([(p.grad - h / 4.0).flatten() for p, h in zip(params, hand, strict=True)])  # type: ignore[operator]
    assert float(noise.std()) == pytest.approx(2.0 * 0.05 / 4.0, rel=0.1)


def test_a_dp_sgd_client_trains_reports_epsilon_and_is_reproducible_by_seed() -> None:
    noisy = PrivacyConfig(mode="dp-sgd", max_grad_norm=0.5, noise_multiplier=1.0, noise_seed=3, delta=1e-2)
    a, b = _client(noisy), _client(noisy)
    before = {n: f.B.clone() for n, f in extract(a.model).items()}
    ua, stats = a.fit(1)
    ub, _ = b.fit(1)
    assert a.dp is not None and a.dp.q == pytest.approx(2 / 9) and a.dp.steps == 2 * 3
    assert stats.epsilon == pytest.approx(Accountant(1.0, 2 / 9, 1e-2).epsilon(3))
    for name, f in ua.modules.items():
        assert not torch.equal(f.B, before[name])  # it trained
        assert torch.equal(f.B, ub.modules[name].B)  # the seed reproduces sampling and noise
    _, stats2 = a.fit(2)  # the hooks were removed: a second round wraps the model again
    assert stats2.epsilon is not None and stats2.epsilon > stats.epsilon  # type: ignore[operator]
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in a.model.parameters())


def test_a_logical_batch_in_micro_batches_takes_the_same_step() -> None:
    """DP-SGD with grad_accum: the Poisson batch of expected size batch_size x grad_accum goes through
    batch_size rows at a time, clipped sums added, noise drawn once: the same update as one batch of
    that size with the same sampling and noise (and the same plan: q = 8 / 9, about 8 rows a step, so
    four micro-batches of 2)."""
    from dataclasses import replace

    noisy = PrivacyConfig(mode="dp-sgd", max_grad_norm=0.5, noise_multiplier=1.0, noise_seed=3, delta=1e-2)
    lora = AdapterConfig(ranks=(4,), alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    whole, parts = (
        LocalClient("c0", tiny_llama(vocab_size=VOCAB_SIZE), tiny_tokenizer(), DATA[0], lora, t, _protocol(),
                    seed=0, privacy=noisy, rounds=1)
        for t in (replace(TRAIN, batch_size=8, grad_accum=1), replace(TRAIN, batch_size=2, grad_accum=4))
    )  # fmt: skip
    assert whole.dp == parts.dp and parts.dp is not None and parts.dp.q == pytest.approx(8 / 9)
    uw, sw = whole.fit(1)
    up, sp = parts.fit(1)
    assert sw.tokens == sp.tokens > 0  # the same rows were drawn
    for name, f in uw.modules.items():
        torch.testing.assert_close(up.modules[name].B, f.B, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(up.modules[name].A, f.A, rtol=1e-4, atol=1e-6)


def test_poisson_batches_have_the_expected_size() -> None:
    g = noise_generator(0, 0)
    sizes = [len(poisson_rows(1000, 0.01, g)) for _ in range(400)]
    assert (sum(sizes) / len(sizes) == pytest.approx(10, rel=0.1) and 0 in sizes) or min(sizes) < 5


def test_plans_refuse_what_they_cannot_keep() -> None:
    with pytest.raises(ConfigError, match=r"spend epsilon .* beyond privacy.target_epsilon = 1"):
        plan(100, 10, 200, 1.0, 1e-5, 0.5, 1.0)
    with pytest.raises(ConfigError, match="not below 1 / 50"):
        plan(50, 10, 20, 1.0, 0.05, 1.0, None)
    calibrated = plan(1000, 10, 300, 1.0, 1e-5, None, 3.0)
    assert calibrated.epsilon(300) <= 3.0 and calibrated.q == 0.01
