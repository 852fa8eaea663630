"""Client-level differential privacy on a trusted server (DP-FedAvg, McMahan et al. 2018), for the
products of LoRA factors (FLoRIST, FLoRA: ``noised_mean``) and for the factors a method averages
(``noised_mean_factor``, the same steps on their change from the global the round began at): B
against a shared A (FFA-LoRA, FedSVD), B and A both (FedIT, whose round 1 begins at the shared draw
of A every client starts from, known to the server by its seed), or the r x r core R between a frozen
basis (Fed-SB, whose round 0 is one more release: ``noised_gradient_sum``).

Per round, with the sampled clients' changes Delta W_k = s B_k A_k (less any warm part):

    clip    Delta W_k <- Delta W_k min(1, C / ||Delta W_k||)   one norm over all modules together;
            ||s B A||_F^2 = tr((s^2 B^T B)(A A^T)) from r x r Gram matrices, B scaled: never m x n
    noise   S = (sum_k Delta W_k + Z) / D,  Z_ij ~ N(0, (sigma C)^2) per entry of every module
    release S, factored by its SVD, as the one update the aggregator sees

Adding or removing one client moves ``sum_k Delta W_k`` by at most C (in the norm over all modules),
so releasing it with N(0, sigma^2 C^2) noise is the Gaussian mechanism of noise multiplier sigma;
dividing by D and everything the aggregator then does (stacking, SVD, a rank from the noised
spectrum) are post-processing. D is public and fixed by the config, never the number of clients
that replied (which one client's presence changes): the round's scheduled count, else the expected
size of the sample, fraction x num_clients (McMahan et al.'s fixed-denominator estimator;
``FloristConfig.dp_denominator``). With ``fraction`` < 1 the clients are a Poisson sample drawn from
secret randomness (``secret_random``, ``Server.participants``), the sampling whose amplification the
accountant counts. Every client gets weight 1 / D: weighting by n_k would let one client's share,
and so the sensitivity, grow with its data. The noise is dense: m x n per module at the server
(float64: 128 MiB for a 4096 x 4096 matrix, one module at a time).

The noise comes from the operating system's randomness unless ``privacy.noise_seed`` is set, which
makes it reproducible by anyone who has the config: for studies and tests only, not private.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from florist.lora import ClientUpdate, LoraFactors

NOISED = "dp-noised-mean"  # the client id of the one update the aggregator sees


def change_norm(update: ClientUpdate) -> float:
    """``||Delta W||_F`` over all modules, from r x r Gram matrices in float64 (``ClientUpdate.change``
    without an m x n matrix; a start, FedEx-LoRA's, is not supported)."""
    total = 0.0
    for f in update.modules.values():
        B, A = f.effective(torch.float64)  # (m, r), (r, n)
        total += float(torch.trace((B.T @ B) @ (A @ A.T)))
    return math.sqrt(max(total, 0.0))


def clip_change(update: ClientUpdate, bound: float) -> tuple[ClientUpdate, float]:
    """The update with its whole change scaled to norm at most ``bound`` (B scaled), and its norm."""
    norm = change_norm(update)
    if norm <= bound:
        return update, norm
    s = bound / norm
    return replace(update, modules={n: replace(f, B=f.B * s) for n, f in update.modules.items()}), norm


def noise_generator(seed: int | None, round: int) -> torch.Generator:
    """The round's noise source: OS randomness, or (``privacy.noise_seed``, not private) a seeded one."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63) if seed is None else (seed * 1_000_003 + round) % 2**63)
    return g


def secret_random(seed: int | None, round: int) -> random.Random:
    """The round's client sampler: OS randomness, or (``privacy.noise_seed``, not private) a seeded
    one, apart from the noise's stream."""
    if seed is None:
        return random.SystemRandom()
    return random.Random(f"florist-dp-sample/{seed}/{round}")


def noised_mean(
    updates: Sequence[ClientUpdate],
    bound: float,
    sigma: float,
    generator: torch.Generator,
    denominator: float | None = None,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[ClientUpdate, float]:
    """``(sum_k clip(Delta W_k) + Z) / D`` per module as one update (factored by its SVD), and the
    per-entry noise std of that mean, ``sigma C / D`` (D: ``denominator``, else the updates' count).
    With no update (an empty sample) the release is ``Z / D``, noise alone, on the modules of
    ``shapes`` (``(m, n)`` per module name): what the analysed mechanism releases then."""
    if not updates and (shapes is None or not denominator):
        raise ValueError("client-level DP with no update needs the module shapes and the denominator")
    clipped = [clip_change(u, bound)[0] for u in updates]
    m, std = denominator or len(clipped), sigma * bound
    if clipped:
        shapes = {name: (f.B.shape[0], f.A.shape[1]) for name, f in clipped[0].modules.items()}
    assert shapes is not None
    modules = {}
    for name in sorted(shapes):
        total = sum((u.modules[name].delta(torch.float64) for u in clipped),
                    torch.zeros(shapes[name], dtype=torch.float64))  # fmt: skip
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64) * std
        U, S, Vh = torch.linalg.svd((total + noise) / m, full_matrices=False)
        modules[name] = LoraFactors(A=Vh.float(), B=(U * S).float())
    return ClientUpdate(NOISED, 1.0, modules), std / m


def noised_gradient_sum(
    gradients: Sequence[Mapping[str, torch.Tensor]], bound: float, sigma: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Fed-SB's round 0 under client-level DP: each client's summed gradient clipped to ``bound`` over
    all modules, their sum noised with N(0, sigma^2 C^2) per entry: the one gradient the server's
    sign step sees (only its sign is used, so the scale C does not matter)."""
    if not gradients:
        raise ValueError("client-level DP needs at least one gradient")
    norms = [math.sqrt(sum(float(t.double().square().sum()) for t in g.values())) for g in gradients]
    out = {}
    for name in sorted(gradients[0]):
        total = sum(g[name].double() * min(1.0, bound / n) if n > 0 else g[name].double()
                    for g, n in zip(gradients, norms, strict=True))  # fmt: skip
        assert isinstance(total, torch.Tensor)
        out[name] = total + torch.randn(total.shape, generator=generator, dtype=torch.float64) * sigma * bound
    return out


def noised_mean_factor(
    updates: Sequence[ClientUpdate],
    start: Mapping[str, LoraFactors] | None,
    bound: float,
    sigma: float,
    generator: torch.Generator,
    with_a: bool = False,
    denominator: float | None = None,
) -> tuple[ClientUpdate, float]:
    """DP-FedAvg on the factors a method averages: FFA-LoRA's and FedSVD's B against the shared A
    (released as ``start`` holds it, never as a client sent it), both factors (``with_a``: FedIT), or
    Fed-SB's core ``s R`` (its changes from the global core; the basis is the server's own, put back
    by ``TrainCore.deltas``). Each client's change from ``start`` (the global the round began from;
    None: B = 0, only without ``with_a``), ``s B_k - B_start`` and with ``with_a`` also
    ``A_k - A_start``, is clipped to ``bound`` as one vector over all modules, the sum noised with
    N(0, sigma^2 C^2) per entry, divided by D (``denominator``, else the updates' count) and added
    back to the start. With no update (an empty sample) the release is the start plus ``Z / D``,
    noise alone, on the start's factors."""
    if not updates and (start is None or not denominator):
        raise ValueError("client-level DP with no update needs the start and the denominator")
    if with_a and start is None:
        raise ValueError("DP-FedAvg on both factors needs the factors the round began from")
    first = updates[0].modules if updates else start
    assert first is not None
    cores = any(f.core is not None for mods in [u.modules for u in updates] or [first] for f in mods.values())
    factors = ("core",) if cores else ("B", "A") if with_a else ("B",)
    begin: dict[tuple[str, str], torch.Tensor] = {}
    changes = []
    for u in updates:
        parts = {}
        for name, f in u.modules.items():
            now = _trained(f)
            for which in factors:
                if (name, which) not in begin:
                    was = _trained(start[name]) if start else {}
                    begin[(name, which)] = was.get(which, torch.zeros_like(now[which]))
                base = begin[(name, which)]
                if base.shape != now[which].shape:
                    raise ValueError(
                        f"module {name!r}: the start's {which} {tuple(base.shape)} is not the upload's"
                    )
                parts[(name, which)] = now[which] - base
        changes.append(parts)
    if not updates:  # noise alone, on the start's factors
        for name, f in first.items():
            was = _trained(f)
            begin.update({(name, which): was[which] for which in factors})
    m, std = denominator or len(changes), sigma * bound
    norms = [math.sqrt(sum(float(t.double().square().sum()) for t in c.values())) for c in changes]
    released: dict[tuple[str, str], torch.Tensor] = {}
    for key in sorted(begin):
        total = sum((c[key].double() * min(1.0, bound / n) if n > 0 else c[key].double()
                     for c, n in zip(changes, norms, strict=True)),
                    torch.zeros(begin[key].shape, dtype=torch.float64))  # fmt: skip
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64) * std
        released[key] = (begin[key].double() + (total + noise) / m).float()
    out = {}
    for name, f in sorted(first.items()):
        if cores:  # Fed-SB: the released core on the (server's) basis
            out[name] = LoraFactors(A=f.A, B=f.B, core=released[(name, "core")])
        else:
            A = released[(name, "A")] if with_a else start[name].A if start else f.A
            out[name] = LoraFactors(A=A, B=released[(name, "B")])
    return ClientUpdate(NOISED, 1.0, out), std / m


def _trained(f: LoraFactors) -> dict[str, torch.Tensor]:
    """The factors a method averages, as trained: s B and A, or Fed-SB's s R on its frozen basis."""
    if f.core is not None:
        return {"core": f.core * f.scaling, "B": f.B}
    B, A = f.effective()
    return {"B": B, "A": A}
