"""Fed-SB (Singhal, Ponkshe et al., arXiv 2502.15436): a frozen basis B, A set once from the clients'
gradient (LoRA-SB's initialisation); clients train only the r x r core R between them; the server
averages the cores.

    round 0   client k: G_k = sum over its first rows' batches of d loss / d W0  (per module, m x n)
              server:   step = -lr_init * sign(sum_k G_k);  step ~ B S A  (rank-r randomised SVD)
                        basis B (m, r) orthonormal columns, A (r, n) orthonormal rows, R_0 = diag(S)
    round t   client k: load R_{t-1}, train R (B, A frozen), send R_k   (r^2 numbers per module)
              server:   R_t = sum_k p_k s_k R_k;  delta W_t = B R_t A   (exact: B and A are shared)

Each client's model is ``W0 + s B R A`` with R its own; the server's is ``W0 + B R_t A``; both start at
``W0 + B R_0 A``, the rank-r approximation of the sign step (about one Adam step of full fine-tuning).
Bytes: the gradient (m x n per module) up once per client, the basis (B, A) and R_0 down once; then
R each way every round. Under Flower round 0 is a ``query.init`` message before round 1
(``florist.flower.strategy.FederatedLoRA.initialise``), and a client gets the basis with its first
download (again after a server restart).

Where florist follows the reference code (``putssander/fed-sb``, a fork of ``CERT-Lab/fed-sb``:
``utils/gradient_utils.py::estimate_and_process_grads_torch``, ``utils/initialization_utils.py``,
``utils/svd_utils.py::get_svd_grad``, ``fed/CR/multiround_train_cr_fed.py``):
- the gradient is the sum over batches of each batch's mean-loss gradient, over ``init_samples`` rows
  (the reference's ``--num_samples``, 170 for commonsense reasoning); the step is ``-lr_init sign(G)``
  with ``lr_init = lr / (warmup_ratio x total steps)``, warmup ratio 0.02;
- ``torch.svd_lowrank`` of the step's transpose, ``q = r``, 10 power iterations, seed 42; A = U^T,
  B = V, R_0 = diag(S); B and A frozen, only R trains (AdamW, a fresh optimiser every round);
- the server's core is the plain average of the clients' cores, and the base weights never change.

Where it differs, and why:
- The gradient is federated: each client sums its own rows' gradients (its share, proportional to
  n_k, of ``init_samples``) and the server adds them, where the reference computes it on the pooled
  training set, which no federated server has. The sum of the clients' sums is the pooled sum.
- The initial adapter is ``B R_0 A`` whatever ``lora.alpha`` is (R_0 = diag(S) / s on the client);
  the reference sets alpha = r, so s = 1 and the two agree.
- Cores are weighted by p_k = n_k / sum n like every aggregator here (the reference's clients hold
  equal shares, where the two agree). The reference's multi-round loop also averages the cores of
  every earlier round's clients (its list of client states is never cleared); florist averages the
  round's.
- The basis and R_0 travel once in the wire dtype and both sides use them as rounded; the reference
  holds them in bf16.
- With r above min(m, n) the directions beyond min(m, n) are zero (nothing to train against).
- The sign step's size is at most ``lr``: the reference's ``lr / (0.02 x steps)`` is the first rate
  of a warmup of 0.02 x steps steps, which its runs (thousands of steps) make tiny; below 50 steps
  that warmup is shorter than one step and the formula grows past ``lr`` (4.2 lr at 12 steps, whose
  start raised the training loss from 2.6 to 4.2 nats on SmolLM2 in florist's privacy study). From
  50 steps on the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.base import AggregationResult, Aggregator, ClientProtocol, module_names, register
from florist.dtypes import WIRE, torch_dtype
from florist.errors import InvalidUpdate
from florist.lora.update import ClientUpdate, LoraFactors

WARMUP_RATIO = 0.02  # the reference's --warmup_ratio default, in its lr_init = lr / (ratio x steps)
SVD_SEED, SVD_ITERATIONS = 42, 10  # the reference's get_svd_grad


def default_init_lr(lr: float, total_steps: int) -> float:
    """The reference's ``lr / (warmup_ratio x total training steps)``, the first step's rate of a
    linear warmup; with fewer than 1 / warmup_ratio = 50 steps the warmup is shorter than one step, so
    the rate is ``lr`` (the reference's formula would exceed it: 4.2 lr at 12 steps)."""
    return lr / max(1.0, WARMUP_RATIO * total_steps)


def init_shares(total: int, sizes: Sequence[float]) -> list[int]:
    """Rows each client sums its gradient over: its share of ``total`` by size, at least one."""
    whole = sum(sizes)
    return [max(1, math.ceil(total * n / whole)) for n in sizes]


def sign_step_basis(gradient: Tensor, rank: int, lr: float) -> LoraFactors:
    """LoRA-SB's start of one module from its summed gradient ``(m, n)``: the rank-``rank``
    randomised SVD of ``-lr sign(G)`` as ``B (m, r) @ diag(S) @ A (r, n)`` (``core = diag(S)``)."""
    step = -lr * torch.sign(gradient.to(torch.float32))  # (m, n)
    m, n = step.shape
    q = min(rank, m, n)
    with torch.random.fork_rng(devices=[]):  # the reference seeds the global generator; keep ours
        torch.manual_seed(SVD_SEED)
        U, S, V = torch.svd_lowrank(step.T, q=q, niter=SVD_ITERATIONS)  # step^T (n, m) = U S V^T
    B, A, core = V, U.T, torch.diag(S)  # step = V S U^T
    if q < rank:  # directions beyond min(m, n): zero
        B = torch.cat([B, B.new_zeros(m, rank - q)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - q, n)])
        core = torch.diag(torch.cat([S, S.new_zeros(rank - q)]))
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), core=core)


@register("fedsb")
@dataclass(frozen=True)
class FedSB(Aggregator):
    """Fed-SB aggregation: the weighted mean of the clients' cores between the shared basis.

    Parameters
    ----------
    dtype : torch.dtype
        Compute dtype, float32 or float64.
    """

    dtype: torch.dtype = torch.float32

    protocol = ClientProtocol.TRAIN_CORE
    exact = True
    products_only = False  # only the cores are averaged; the basis must be the server's
    label = "Fed-SB"

    def _aggregate(self, updates: Sequence[ClientUpdate], weights: Tensor) -> AggregationResult:
        global_update = {}
        for name in module_names(updates):
            first = updates[0].modules[name]
            cores = []
            for u in updates:
                f = u.modules[name]
                if f.core is None:
                    raise InvalidUpdate(
                        u.client_id, "a Fed-SB update is a core R on the shared basis (a PEFT LoRA has none)",
                        module=name,
                    )  # fmt: skip
                if not all(a is b or torch.equal(a, b) for a, b in ((f.B, first.B), (f.A, first.A))):
                    raise InvalidUpdate(u.client_id, "Fed-SB needs every core on one basis", module=name)
                cores.append(f.core.to(self.dtype) * f.scaling)
            core = (torch.stack(cores) * weights.to(self.dtype)[:, None, None]).sum(0)
            global_update[name] = LoraFactors(A=first.A, B=first.B, core=core)
        return AggregationResult(
            method=self.name,
            protocol=self.protocol,
            global_update=global_update,
            energy_kept={name: 1.0 for name in global_update},
        )

    def initial(
        self, gradients: Sequence[Mapping[str, Tensor]], rank: int, lr: float, wire: str = "float32"
    ) -> AggregationResult:
        """Round 0: the run's starting adapter from the clients' summed gradients, the basis and R_0
        rounded to the wire dtype as they are sent (both sides hold them so)."""
        if not gradients:
            raise ValueError("Fed-SB's round 0 needs at least one client's gradient")
        dt = torch_dtype(wire, "wire dtype", WIRE)
        start = {}
        for name in sorted(gradients[0]):
            total = torch.stack([g[name].to(torch.float32) for g in gradients]).sum(0)
            f = sign_step_basis(total, rank, lr)
            start[name] = LoraFactors(
                A=f.A.to(dt).float(),
                B=f.B.to(dt).float(),
                core=f.core.to(dt).float(),  # type: ignore[union-attr]
            )
        return AggregationResult(method=self.name, protocol=self.protocol, global_update=start)
