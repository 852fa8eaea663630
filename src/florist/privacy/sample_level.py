"""Sample-level differential privacy on each client: DP-SGD (Abadi et al. 2016) on the LoRA parameters.

Every optimizer step of client k:

    sample  each of its n_k rows joins the batch with probability q_k = B / n_k (Poisson sampling),
            B = train.batch_size x train.grad_accum, processed batch_size rows at a time
    grads   per example i, g_i = d loss_i / d theta (its own mean token loss; Opacus's hooks,
            ``opacus.GradSampleModule``, on the trainable LoRA layers only)
    clip    g_i <- g_i min(1, C / ||g_i||)          (one norm over all LoRA parameters)
    noise   g = (sum_i g_i + N(0, sigma^2 C^2 I)) / B   then the optimizer's step (AdamW)

The sum moves by at most C when one row is added or removed, so each step is the subsampled Gaussian
mechanism; the accountant (``florist.privacy.accountant``) composes the run's steps, rounds x steps
per round, at rate q_k. Whatever leaves the client afterwards (its upload, any server aggregation)
is post-processing: every method keeps the guarantee, against the server too. Its train loss, token
counts and training time depend on the sampled rows without noise, so they never leave it (the
reply carries its example count, steps and epsilon only).

The loss is each example's own mean over its labelled tokens, averaged over the batch: a token mean
over the whole batch would make one example's gradient depend on the others' lengths. Batches are
padded (one example per row), so per-example gradients are per row; training runs in float32.
Sampling and noise come from the operating system's randomness unless ``privacy.noise_seed`` is
set (reproducible, not private).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from florist.errors import ConfigError
from florist.privacy.accountant import Accountant, noise_for


@dataclass(frozen=True)
class SamplePlan:
    """One client's DP-SGD: noise multiplier, clip bound, rate and the steps of the whole run."""

    sigma: float
    clip: float
    q: float
    steps: int
    delta: float

    def epsilon(self, steps_done: int) -> float:
        return Accountant(self.sigma, self.q, self.delta).epsilon(steps_done)


def plan(
    num_examples: int, batch_size: int, steps: int, clip: float, delta: float,
    sigma: float | None, target_epsilon: float | None,
) -> SamplePlan:  # fmt: skip
    """A client's plan: ``sigma`` given (and within ``target_epsilon`` if both), or the smallest one
    that keeps the run within ``target_epsilon``; a ``ConfigError`` naming the numbers otherwise."""
    q = min(1.0, batch_size / max(1, num_examples))
    if delta >= 1 / num_examples:
        raise ConfigError(f"privacy.delta = {delta:g} is not below 1 / {num_examples} (a client's rows)")
    if sigma is None:
        if target_epsilon is None:
            raise ConfigError(
                "privacy.mode = 'dp-sgd' needs privacy.noise_multiplier or privacy.target_epsilon"
            )
        sigma = noise_for(target_epsilon, delta, q, steps)
    out = SamplePlan(sigma, clip, q, steps, delta)
    if target_epsilon is not None and (spent := out.epsilon(steps)) > target_epsilon * (1 + 1e-9):
        raise ConfigError(
            f"privacy: {steps} DP-SGD steps at noise multiplier {sigma:g}, sample rate {q:.3g} (batch "
            f"{batch_size} of {num_examples} rows) spend epsilon {spent:.3g} at delta {delta:g}, beyond "
            f"privacy.target_epsilon = {target_epsilon:g}"
        )
    return out


def poisson_rows(n: int, q: float, generator: torch.Generator) -> list[int]:
    """The rows of one Poisson-sampled batch: each of ``n`` independently with probability ``q``."""
    return torch.nonzero(torch.rand(n, generator=generator) < q).flatten().tolist()


def clipped_sum(
    params: Sequence[torch.nn.Parameter], clip: float, into: Sequence[torch.Tensor]
) -> tuple[int, int]:
    """Add ``sum_i clip(g_i)`` of the per-example gradients ``p.grad_sample`` (one micro-batch) into
    ``into`` and drop them; returns the micro-batch's size and how many of its examples were clipped.
    A logical batch too large for memory is several micro-batches summed before one ``noised_step``."""
    samples = [getattr(p, "grad_sample", None) for p in params]
    b = 0 if samples[0] is None else int(samples[0].shape[0])
    clipped = 0
    if b:
        squares = [s.reshape(b, -1).float().square().sum(1) for s in samples if s is not None]
        norms = torch.stack(squares).sum(0).sqrt()  # (b,): each example's norm over all parameters
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        clipped = int((norms > clip).sum())
        for t, s in zip(into, samples, strict=True):
            if s is not None:
                t += torch.einsum("i,i...->...", factor, s.float()).to(t.device)
    for p in params:
        p.grad_sample = None  # type: ignore[attr-defined]
    return b, clipped


def noised_step(
    params: Sequence[torch.nn.Parameter], total: Sequence[torch.Tensor], expected_batch: float, clip: float,
    sigma: float, generator: torch.Generator,
) -> None:  # fmt: skip
    """``p.grad = (total + N(0, sigma^2 C^2)) / expected_batch``: the step's one draw of noise."""
    for p, t in zip(params, total, strict=True):
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * (sigma * clip)
        p.grad = ((t + noise.to(t.device)) / expected_batch).to(p.dtype)
