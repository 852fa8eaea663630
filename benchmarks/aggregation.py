"""Server aggregation cost: FLoRIST against the dense paths and the QR lower bound, in one run.

Run from the repository root:

    .venv/bin/python benchmarks/aggregation.py [--quick] [--scenarios a,b] [--out results.json]

It prints one table per scenario and writes every number to JSON (default
``benchmarks/results/aggregation.json``). ``--scenarios`` runs only the named scenarios (e.g.
``llama70b-all-k8,llama70b-all-k32``). ``--quick`` is a smoke run (a few minutes): 2 layers per
scenario, the LLaMA-7B shapes divided by 4 and the LLaMA-70B ones by 16, so its numbers are not the
real ones.

Paths, per adapted matrix ``W: (m, n)``, K clients, ``R = sum_k r_k``:

- ``florist (qr)``: ``make_aggregator("florist", policy=EnergyThreshold(0.9))``; Householder QRs of
  the stacks ``B_stack (m, R)`` and ``A_stack^T (n, R)`` kept in compact form (``torch.geqrf``), SVD of
  the ``R x R`` core, the kept singular vectors applied with ``torch.ormqr``; O((m + n) R^2) time and
  O((m + n) R) memory, never an ``(m, n)`` matrix and never the full orthonormal bases.
- ``florist (svd)``: the same with ``basis="svd"`` (the paper's literal thin-SVD pipeline).
- ``florist (qr, error feedback)``: ``aggregation.error_feedback``'s steady state: the previous
  round's tail (up to ``R`` directions per module, from one untimed aggregation of the same updates)
  stacked beside the clients, so the stacks are up to ``2R`` wide, and the new tail kept.
- ``flexlora``: ``make_aggregator("flexlora")``: dense ``delta W = sum_k p_k B_k A_k`` ``(m, n)``
  and a full ``torch.linalg.svd``; O(m n min(m, n)) time, O(m n) memory.
- ``peft svd``: peft's ``add_weighted_adapter(combination_type="svd")`` on a tiny ``torch.nn`` model
  with the scenario's Linear shapes and one adapter per client (its own rank and scaling).
- ``QR lower bound``: only ``torch.linalg.qr`` of both stacks (built beforehand, untimed); any
  method that forms orthonormal bases of the two stacks pays at least this. florist no longer forms
  them, so it can beat this "bound"; the goal is still stated against it.
- ``Householder QR only``: only ``torch.geqrf`` of both stacks: the factorisation florist's qr basis
  starts from, without forming Q (the floor of any QR-based method).

Scenarios: SmolLM2-135M q/k/v/o, LLaMA-7B q/v (r = 16 and mixed ranks), and LLaMA-70B with all seven
adapted kinds per layer (q/o 8192x8192, k/v 1024x8192, gate/up 28672x8192, down 8192x28672 as
out x in; 80 layers) for K = 8 and K = 32 clients of rank 16. Clients beyond the 8 Dolly client
sizes repeat them (client k has ``CLIENT_SIZES[k % 8]`` examples).

Timing: the fast paths (florist and the QR bound) run ``REPEATS`` rounds, interleaved (each round
runs every fast path, in reversed order every other round, so a burst of load hits all of them
alike), median of the round totals reported; on every module, except at 70B shapes, where they run
on the first ``LARGE_TIMED_LAYERS`` layers, alternate module by module, and are extrapolated
linearly to all layers (every layer has the same shapes). The goal line also gives the florist /
QR-bound ratio of the fastest round of each module ("fastest rounds"), the figure least inflated
by other work on the machine. The dense paths (flexlora, peft) are timed once on the first
``dense_layers`` layers and extrapolated linearly; at 70B shapes flexlora is timed
(``MODEL_REPEATS`` runs, median) on ONE module of the smallest shape (k_proj) and extrapolated to
every module by a flop model (``m n R`` to form ``delta W`` plus ``m n min(m, n)`` for its SVD,
each term scaled from its own measured share), and peft is not run (it forms K dense ``(m, n)``
matrices and, with peft's default ``full_matrices=True``, ``m x m`` and ``n x n`` SVD factors:
hours per 70B layer on this machine). The tables mark linear extrapolation with ``*`` and the flop model with
``†``.
Aggregator times are ``AggregationResult.seconds`` (input validation, shared by every aggregator,
is timed apart). Peak extra memory: each path runs in a fresh spawned process on ONE module of the
scenario's largest shape; the peak RSS (``VmHWM``, reset to the current RSS once the inputs are
built) is read before and after the path ran. ``ru_maxrss`` is not used: Linux carries it across
exec, so a spawned child starts at its parent's peak. At 70B shapes the dense paths are not run
for memory either: their figure is the analytic ``m n 4`` bytes of one dense ``delta W`` of the
largest shape (a lower bound; marked ``‡``). All factors are float32, random, from a fixed seed;
torch uses 2 threads.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from florist.aggregation import EnergyThreshold, FixedRank, make_aggregator
from florist.aggregation.flexlora import dense_aggregate
from florist.aggregation.linalg import stack_module
from florist.console import quiet_imports
from florist.fsutil import write_json_atomic
from florist.lora import ClientUpdate, LoraFactors, client_weights, validate_updates
from florist.lora.distance import relative_error

THREADS = 2
SEED = 0
TAU = 0.9
CLIENT_SIZES = (1579, 685, 3775, 1830, 2152, 1776, 2531, 607)  # Dolly split over 8 clients
ALPHA_PER_RANK = 2  # lora_alpha = 2 r, so every client's scaling alpha / r is 2
REPEATS = {"full": 5, "quick": 3}
MEMORY_WORKERS = 2
BUSY_LOAD = 0.5  # warn above this 1-minute load average at the start
SPEEDUP_GOAL = 100.0  # florist at least this much faster than each dense path (7B shapes)
QR_BOUND_GOAL = 2.0  # florist within this factor of the QR lower bound (SmolLM2, LLaMA-7B)
QR_BOUND_GOAL_70B = 1.5  # ... and of the bound at LLaMA-70B shapes (issue #14)
LARGE_TIMED_LAYERS = 2  # 70B: the fast paths run on this many of the 80 layers, then extrapolated
MODEL_REPEATS = 3  # 70B: runs of the dense path on its one module (flop model), median used
FORM_REPEATS = 3  # ... and timings of forming that module's dense delta W alone
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "aggregation.json"

SMOLLM2_ATTN = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
LLAMA7B_QV = {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}
LLAMA70B_ALL = {  # (out, in) of every adapted Linear of one LLaMA-2/3-70B layer (GQA: 8 KV heads)
    "q_proj": (8192, 8192),
    "k_proj": (1024, 8192),
    "v_proj": (1024, 8192),
    "o_proj": (8192, 8192),
    "gate_proj": (28672, 8192),
    "up_proj": (28672, 8192),
    "down_proj": (8192, 28672),
}
MLP_KINDS = frozenset({"gate_proj", "up_proj", "down_proj"})  # under ``mlp``, the rest ``self_attn``


def block_of(kind: str) -> str:
    """The submodule of a decoder layer that holds ``kind``: ``mlp`` or ``self_attn``."""
    return "mlp" if kind in MLP_KINDS else "self_attn"


def client_size(k: int) -> int:
    """Examples of client ``k``: the 8 Dolly client sizes, repeated beyond 8 clients."""
    return CLIENT_SIZES[k % len(CLIENT_SIZES)]


# ---------------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """Adapted modules ``model.layers.{i}.{self_attn|mlp}.{kind}`` with ``W: (m, n)`` and client ranks."""

    name: str
    title: str
    kinds: dict[str, tuple[int, int]]  # kind -> (m, n) = (out, in) of the adapted weight
    layers: int
    ranks: tuple[int, ...]  # r_k per client, in client-id order
    dense_layers: int  # layers the dense paths are timed on (then extrapolated)
    speedup_goal: bool = False  # is the >= 100x goal stated for this scenario?
    fast_layers: int | None = None  # layers florist and the QR bound are timed on (None: all)
    dense_model: bool = False  # dense paths: one smallest module, then the flop model (no peft)
    qr_bound_goal: float = QR_BOUND_GOAL  # florist (qr) within this factor of the QR bound

    def module(self, layer: int, kind: str) -> str:
        return f"model.layers.{layer}.{block_of(kind)}.{kind}"

    def modules(self, layers: int | None = None) -> list[str]:
        n = self.layers if layers is None else layers
        return [self.module(i, kind) for i in range(n) for kind in self.kinds]

    def paths(self) -> list[str]:
        """The paths run on this scenario, in ``PATHS`` order."""
        return [p for p in PATHS if p not in self.skipped()]

    def skipped(self) -> dict[str, str]:
        """Paths not run, and why."""
        if not self.dense_model:
            return {}
        return {"peft_svd": "not run: K dense (m, n) matrices and full m x m, n x n SVD factors per module"}

    @property
    def timed_layers(self) -> int:
        """Layers the fast paths run on."""
        return self.layers if self.fast_layers is None else self.fast_layers

    @property
    def built_layers(self) -> int:
        """Layers whose factors are built: what any path is timed on."""
        return max(self.timed_layers, 1 if self.dense_model else self.dense_layers)

    @property
    def R(self) -> int:
        return sum(self.ranks)

    @property
    def largest_kind(self) -> str:
        return max(self.kinds, key=lambda k: self.kinds[k][0] * self.kinds[k][1])

    @property
    def smallest_kind(self) -> str:
        return min(self.kinds, key=lambda k: self.kinds[k][0] * self.kinds[k][1])


def scenarios(quick: bool) -> list[Scenario]:
    """(a) SmolLM2-135M attention, (b) LLaMA-7B q/v at r = 16, (c) the same with mixed ranks,
    (d, e) LLaMA-70B, all seven kinds, K = 8 and K = 32 clients of rank 16.

    The dense paths are timed on all SmolLM2 layers and on one LLaMA-7B layer (2 of 64 modules).
    ``quick``: 2 layers each (70B: fast paths timed on 1), 7B shapes divided by 4, 70B ones by 16.
    """
    smol_layers, llama_layers, div = (2, 2, 4) if quick else (30, 32, 1)
    llama = {k: (m // div, n // div) for k, (m, n) in LLAMA7B_QV.items()}
    hetero = (64, 32, 16, 16, 8, 8, 4, 4)
    return [
        Scenario(
            "smollm2-135m-attn", "SmolLM2-135M q/k/v/o", SMOLLM2_ATTN, smol_layers, (16,) * 8, smol_layers
        ),
        Scenario("llama7b-qv-r16", "LLaMA-7B q/v", llama, llama_layers, (16,) * 8, 1, speedup_goal=True),
        Scenario("llama7b-qv-hetero", "LLaMA-7B q/v", llama, llama_layers, hetero, 1, speedup_goal=True),
        *(llama70b(clients, quick) for clients in (8, 32)),
    ]


def llama70b(clients: int, quick: bool) -> Scenario:
    """LLaMA-70B, all seven kinds, ``clients`` of rank 16: fast paths on ``LARGE_TIMED_LAYERS``
    of 80 layers, flexlora on one k_proj by the flop model (``quick``: 1 of 2 layers, shapes / 16)."""
    layers, timed, div = (2, 1, 16) if quick else (80, LARGE_TIMED_LAYERS, 1)
    return Scenario(
        f"llama70b-all-k{clients}",
        "LLaMA-70B q/k/v/o/gate/up/down",
        {k: (m // div, n // div) for k, (m, n) in LLAMA70B_ALL.items()},
        layers,
        (16,) * clients,
        dense_layers=0,
        fast_layers=timed,
        dense_model=True,
        qr_bound_goal=QR_BOUND_GOAL_70B,
    )


TINY = Scenario("warm-up", "warm-up", {"q_proj": (32, 24), "v_proj": (16, 24)}, 1, (4, 2), 1)


def make_updates(sc: Scenario, modules: Sequence[str], seed: int = SEED) -> list[ClientUpdate]:
    """One client per rank in ``sc.ranks``: random ``A: (r_k, n)``, ``B: (m, r_k)``, scaling 2."""
    g = torch.Generator().manual_seed(seed)
    updates = []
    for k, r in enumerate(sc.ranks):
        factors = {}
        for name in modules:
            m, n = sc.kinds[name.rsplit(".", 1)[1]]
            A = torch.randn(r, n, generator=g) / math.sqrt(n)  # (r_k, n)
            B = torch.randn(m, r, generator=g) / math.sqrt(r)  # (m, r_k)
            factors[name] = LoraFactors(A=A, B=B, scaling=float(ALPHA_PER_RANK))  # alpha / r
        updates.append(ClientUpdate(f"client-{k}", client_size(k), factors))
    return updates


def restrict(updates: Sequence[ClientUpdate], modules: Sequence[str]) -> list[ClientUpdate]:
    """The same clients with only ``modules`` (tensors shared, not copied)."""
    return [replace(u, modules={n: u.modules[n] for n in modules}) for u in updates]


# ---------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Run:
    """One timed run: seconds over its modules, and the global factors of the first module."""

    seconds: float
    check: LoraFactors | None = None
    ranks: list[int] | None = None


@dataclass(frozen=True)
class PathSpec:
    """A path is split in two so inputs are built outside the timing and the memory baseline."""

    label: str
    dense: bool
    prepare: Callable[[list[ClientUpdate]], Any]
    execute: Callable[[Any], Run]


def first_module(updates: Sequence[ClientUpdate]) -> str:
    return sorted(updates[0].modules)[0]


def run_aggregator(method: str, options: dict[str, Any], updates: list[ClientUpdate]) -> Run:
    """``make_aggregator(method, **options).aggregate(updates)``; its own server time."""
    result = make_aggregator(method, **options).aggregate(updates)
    ranks = [result.ranks[n] for n in sorted(result.ranks)]
    return Run(result.seconds, result.global_update[first_module(updates)], ranks)


def prepare_stacks(updates: list[ClientUpdate]) -> list[tuple[Tensor, Tensor]]:
    """``(B_stack, A_stack)`` per module, ``(m, R)`` and ``(R, n)``."""
    weights = client_weights(updates)
    return [stack_module(updates, weights, n, torch.float32) for n in sorted(updates[0].modules)]


def householder_bound(stacks: list[tuple[Tensor, Tensor]]) -> Run:
    """The compact factorisation alone: ``geqrf`` of ``B_stack (m, R)`` and ``A_stack^T (n, R)``."""
    start = time.perf_counter()
    for B, A in stacks:
        torch.geqrf(B)  # (m, R) reflectors + R, (R,) tau
        torch.geqrf(A.mT)  # (n, R), (R,)
    return Run(time.perf_counter() - start)


def qr_bound(stacks: list[tuple[Tensor, Tensor]]) -> Run:
    """The least any stack-basis method does: QR of ``B_stack (m, R)`` and ``A_stack^T (n, R)``."""
    start = time.perf_counter()
    for B, A in stacks:
        torch.linalg.qr(B)  # (m, R) -> (m, R), (R, R)
        torch.linalg.qr(A.mT)  # (n, R) -> (n, R), (R, R)
    return Run(time.perf_counter() - start)


def _linear(m: int, n: int) -> nn.Linear:
    return nn.utils.skip_init(nn.Linear, n, m, bias=False)  # weight (m, n), never read


def _tiny_model(kinds: dict[str, tuple[int, int]], layers: int) -> nn.Module:
    """An ``nn.Module`` whose Linears are named ``model.layers.{i}.{self_attn|mlp}.{kind}``."""
    blocks = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        for kind, (m, n) in kinds.items():
            if not hasattr(block, block_of(kind)):
                block.add_module(block_of(kind), nn.Module())
            setattr(getattr(block, block_of(kind)), kind, _linear(m, n))
        blocks.append(block)
    root, root.model = nn.Module(), nn.Module()
    root.model.layers = blocks
    return root


def prepare_peft(updates: list[ClientUpdate]) -> tuple[nn.Module, list[ClientUpdate]]:
    """A peft model with one adapter ``c{k}`` per client (rank r_k, alpha = 2 r_k) set to its factors."""
    from peft import LoraConfig, get_peft_model

    kinds = {n.rsplit(".", 1)[1]: f.shape for n, f in updates[0].modules.items()}
    layers = 1 + max(int(n.split(".")[2]) for n in updates[0].modules)
    ranks = [next(iter(u.modules.values())).rank for u in updates]
    configs = [LoraConfig(r=r, lora_alpha=ALPHA_PER_RANK * r, target_modules=sorted(kinds)) for r in ranks]
    model: Any = get_peft_model(_tiny_model(kinds, layers), configs[0], adapter_name="c0")
    for k, cfg in enumerate(configs[1:], start=1):
        model.add_adapter(f"c{k}", cfg)
    for k, update in enumerate(updates):
        _set_adapter(model, f"c{k}", update)
    return model, updates


def _set_adapter(model: Any, adapter: str, update: ClientUpdate) -> None:
    with torch.no_grad():
        for name, f in update.modules.items():
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A[adapter].weight.copy_(f.A)  # (r_k, n)
            layer.lora_B[adapter].weight.copy_(f.B)  # (m, r_k)


def peft_svd(state: tuple[Any, list[ClientUpdate]]) -> Run:
    """``add_weighted_adapter(combination_type="svd")`` with peft's defaults: rank = the largest client
    rank, ``svd_full_matrices=True``. It forms every client's dense ``delta W_k`` and their sum."""
    model, updates = state
    adapters = [f"c{k}" for k in range(len(updates))]
    weights = client_weights(updates).tolist()
    r_max = max(u.modules[first_module(updates)].rank for u in updates)
    start = time.perf_counter()
    model.base_model.add_weighted_adapter(
        adapters, weights, adapter_name="svd", combination_type="svd", svd_rank=r_max
    )
    seconds = time.perf_counter() - start
    layer = model.base_model.model.get_submodule(first_module(updates))
    A, B = layer.lora_A["svd"].weight.detach(), layer.lora_B["svd"].weight.detach()
    return Run(seconds, LoraFactors(A=A, B=B, scaling=float(layer.scaling["svd"])))


def _identity(updates: list[ClientUpdate]) -> list[ClientUpdate]:
    return updates


def prepare_carried(updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], Any]:
    """The updates and a carried tail: what one error-feedback aggregation of them leaves out."""
    return updates, make_aggregator("florist", policy=EnergyThreshold(TAU), feedback=True).aggregate(
        updates
    ).residual


def florist_carried(state: tuple[list[ClientUpdate], Any]) -> Run:
    updates, carry = state
    return run_aggregator(
        "florist", {"policy": EnergyThreshold(TAU), "feedback": True, "carry": carry}, updates
    )


def aggregator_path(label: str, method: str, options: dict[str, Any], dense: bool = False) -> PathSpec:
    return PathSpec(label, dense, _identity, partial(run_aggregator, method, options))


PATHS: dict[str, PathSpec] = {
    "florist_qr": aggregator_path("florist (qr, tau=0.9)", "florist", {"policy": EnergyThreshold(TAU)}),
    "florist_svd": aggregator_path(
        "florist (svd basis)", "florist", {"policy": EnergyThreshold(TAU), "basis": "svd"}
    ),
    "florist_qr_ef": PathSpec("florist (qr, error feedback)", False, prepare_carried, florist_carried),
    "flexlora": aggregator_path("flexlora (dense + svd)", "flexlora", {}, dense=True),
    "peft_svd": PathSpec("peft add_weighted (svd)", True, prepare_peft, peft_svd),
    "qr_bound": PathSpec("QR lower bound", False, prepare_stacks, qr_bound),
    "geqrf_bound": PathSpec("Householder QR only", False, prepare_stacks, householder_bound),
}

# ---------------------------------------------------------------------------------------------- timing


def warm_up(path: PathSpec) -> None:
    """Run ``path`` once on tiny inputs: lazy imports, kernel dispatch and thread pools start here."""
    path.execute(path.prepare(make_updates(TINY, TINY.modules())))


def time_path(path: PathSpec, updates: list[ClientUpdate], repeats: int) -> tuple[list[float], Run]:
    """Seconds of ``repeats`` runs (inputs rebuilt, untimed, before each) and the last run."""
    samples, last = [], Run(0.0)
    for _ in range(repeats):
        last = path.execute(path.prepare(updates))
        samples.append(last.seconds)
    return samples, last


def timing_row(label: str, samples: list[float], measured: int, total: int) -> dict[str, Any]:
    """Median of ``samples`` over ``measured`` modules, scaled linearly to ``total`` modules."""
    return {
        "label": label,
        "seconds": statistics.median(samples) * total / measured,
        "samples": samples,
        "measured_modules": measured,
        "total_modules": total,
        "extrapolated": measured < total,
        "extrapolation": "linear" if measured < total else None,
    }


def time_fast_paths(
    sc: Scenario, updates: list[ClientUpdate], repeats: int
) -> tuple[dict[str, Any], dict[str, Run]]:
    """Florist and the QR bound on the first ``sc.timed_layers`` layers, ``repeats`` interleaved
    rounds (path order reversed every other round), so a burst of load from other work hits all
    of them alike. Returns the rows and, per path, the ranks of its last round."""
    names = [p for p in sc.paths() if not PATHS[p].dense]
    timed = sc.modules(sc.timed_layers)
    units = [restrict(updates, chunk) for chunk in interleaving_units(sc, timed)]
    per_unit: dict[str, list[list[float]]] = {n: [] for n in names}  # [round][unit] seconds
    ranks: dict[str, list[int]] = {}
    for i in range(repeats):
        seconds, ranks = time_round(units, names if i % 2 == 0 else names[::-1])
        for n in names:
            per_unit[n].append(seconds[n])
    total = len(sc.modules())
    rows = {n: fast_row(PATHS[n].label, per_unit[n], len(timed), total) for n in names}
    return rows, {n: Run(rows[n]["seconds"], None, ranks[n] or None) for n in names}


def interleaving_units(sc: Scenario, timed: list[str]) -> list[list[str]]:
    """Module groups the fast paths alternate on: each module alone at 70B shapes (seconds per
    module, so the paths see the same load), else all modules together (milliseconds per module)."""
    return [[name] for name in timed] if sc.dense_model else [timed]


def time_round(
    units: list[list[ClientUpdate]], names: list[str]
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Every path in ``names`` on every unit, in turn: seconds per unit and ranks, per path."""
    seconds: dict[str, list[float]] = {n: [] for n in names}
    ranks: dict[str, list[int]] = {n: [] for n in names}
    for unit in units:
        for n in names:
            run = PATHS[n].execute(PATHS[n].prepare(unit))
            seconds[n].append(run.seconds)
            ranks[n] += run.ranks or []
    return seconds, ranks


def fast_row(label: str, per_unit: list[list[float]], measured: int, total: int) -> dict[str, Any]:
    """``timing_row`` of the round totals, plus ``best_seconds``: the sum over units of each unit's
    fastest round (the figure least inflated by other work), scaled the same way."""
    row = timing_row(label, [sum(r) for r in per_unit], measured, total)
    row["best_seconds"] = sum(min(unit) for unit in zip(*per_unit, strict=True)) * total / measured
    return row


def time_dense_linear(sc: Scenario, updates: list[ClientUpdate], name: str) -> tuple[dict[str, Any], Run]:
    """A dense path once on the first ``sc.dense_layers`` layers, extrapolated linearly."""
    timed = sc.modules(sc.dense_layers)
    samples, run = time_path(PATHS[name], restrict(updates, timed), 1)
    return timing_row(PATHS[name].label, samples, len(timed), len(sc.modules())), run


def flop_units(m: int, n: int, R: int) -> tuple[int, int]:
    """Flop-model units of the dense path on ``W: (m, n)``: forming ``delta W`` (``m n R``, the K
    rank-r_k products) and its dense SVD (``m n min(m, n)``)."""
    return m * n * R, m * n * min(m, n)


def form_seconds(updates: list[ClientUpdate], module: str) -> float:
    """Median seconds of forming the dense ``delta W (m, n)`` of ``module`` alone, as flexlora does."""
    weights = client_weights(updates)
    samples = []
    for _ in range(FORM_REPEATS):
        start = time.perf_counter()
        dense_aggregate(updates, weights, module, torch.float32)  # (m, n)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def model_seconds(sc: Scenario, form: float, svd: float) -> dict[str, float]:
    """Seconds of the dense path on one module of each kind, from ``form`` and ``svd`` seconds measured
    on one module of ``sc.smallest_kind``: each term scaled by its own flop-model units."""
    form_0, svd_0 = flop_units(*sc.kinds[sc.smallest_kind], sc.R)
    out = {}
    for kind, (m, n) in sc.kinds.items():
        f, g = flop_units(m, n, sc.R)
        out[kind] = form * f / form_0 + svd * g / svd_0
    return out


def time_dense_model(sc: Scenario, updates: list[ClientUpdate], name: str) -> tuple[dict[str, Any], Run]:
    """A dense path on ONE module of the smallest shape (median of ``MODEL_REPEATS``), extrapolated to
    every module of every layer by ``flop_units``; forming ``delta W`` is timed apart to split the terms."""
    module = sc.module(0, sc.smallest_kind)
    one = restrict(updates, [module])
    samples, run = time_path(PATHS[name], one, MODEL_REPEATS)
    measured, form = statistics.median(samples), form_seconds(one, module)
    svd = max(measured - form, 0.0)
    per_kind = model_seconds(sc, form, svd)
    row = timing_row(PATHS[name].label, samples, 1, len(sc.modules()))
    row["seconds"] = sc.layers * sum(per_kind.values())
    row["extrapolation"] = "flop model"
    row["flop_model"] = {
        "module": module,
        "measured_seconds": measured,
        "form_seconds": form,
        "svd_seconds": svd,
        "form_units": "m n R",
        "svd_units": "m n min(m, n)",
        "seconds_per_module": per_kind,
    }
    return row, run


def time_scenario(
    sc: Scenario, updates: list[ClientUpdate], repeats: int
) -> tuple[dict[str, Any], dict[str, Run]]:
    """Every path of ``sc``: seconds over all modules (extrapolated where marked), samples."""
    rows, runs = time_fast_paths(sc, updates, repeats)
    for name in sc.paths():
        if PATHS[name].dense:
            timer = time_dense_model if sc.dense_model else time_dense_linear
            rows[name], runs[name] = timer(sc, updates, name)
    for row in rows.values():
        print(f"  timed {row['label']:<26} {row['seconds']:10.3f} s", flush=True)
    return {n: rows[n] for n in sc.paths()}, runs


def validation_seconds(updates: list[ClientUpdate]) -> float:
    start = time.perf_counter()
    validate_updates(updates)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- memory


def _status_mib(field: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process from ``/proc/self/status``, in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_worker(sc: Scenario, path_name: str) -> dict[str, Any]:
    """In a fresh process: growth of the peak RSS while ``path_name`` aggregates one largest module.

    ``VmHWM`` is read rather than ``ru_maxrss``: Linux keeps ``ru_maxrss`` across exec, so in a
    spawned child it starts at the parent's peak and hides everything smaller.
    """
    torch.set_num_threads(THREADS)
    path = PATHS[path_name]
    warm_up(path)
    state = path.prepare(make_updates(sc, [sc.module(0, sc.largest_kind)]))
    reset = reset_peak()
    before = _status_mib("VmHWM")
    path.execute(state)
    after = _status_mib("VmHWM")
    return {"baseline_mib": before, "peak_extra_mib": after - before, "peak_reset": reset}


def measured(sc: Scenario, path_name: str) -> bool:
    """Is the peak memory of ``path_name`` on ``sc`` measured (else analytic: dense paths at 70B)?"""
    return not (sc.dense_model and PATHS[path_name].dense)


def measure_peaks(scs: Sequence[Scenario]) -> dict[tuple[str, str], dict[str, Any]]:
    """``peak_worker`` for every scenario and measured path, each in its own spawned process;
    ``analytic_peak`` for the others."""
    ctx = mp.get_context("spawn")
    jobs = [(sc, p) for sc in scs for p in sc.paths() if measured(sc, p)]
    with ProcessPoolExecutor(MEMORY_WORKERS, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {(sc.name, p): pool.submit(peak_worker, sc, p) for sc, p in jobs}
        peaks = {key: {**f.result(), "peak_source": "measured"} for key, f in futures.items()}
    for sc in scs:
        peaks.update({(sc.name, p): analytic_peak(sc) for p in sc.paths() if not measured(sc, p)})
    return peaks


def analytic_peak(sc: Scenario) -> dict[str, Any]:
    """The dense ``delta W (m, n)`` of one largest module, float32: a lower bound, not run."""
    return {"peak_extra_mib": analytic(sc)["dense_bytes"] / 2**20, "peak_source": "analytic"}


def analytic(sc: Scenario) -> dict[str, Any]:
    """Sizes of one largest module: both stacks ``(m + n) R`` and the dense ``m n``, float32."""
    m, n = sc.kinds[sc.largest_kind]
    stacks, dense = (m + n) * sc.R * 4, m * n * 4
    return {"kind": sc.largest_kind, "shape": [m, n], "R": sc.R, "stacks_bytes": stacks, "dense_bytes": dense}


# ---------------------------------------------------------------------------------------------- checks


rel_err = relative_error  # ``||got - want||_F / ||want||_F`` in float64 (florist.lora.distance)


def correctness(updates: list[ClientUpdate], runs: dict[str, Run], name: str) -> dict[str, float]:
    """On module ``name`` (the dense paths' first): florist at tau = 1 against the dense sum, and the
    dense paths' rank-r_max truncations against florist's ``FixedRank(r_max)`` (both are the best
    rank-r_max approximation)."""
    one = restrict(updates, [name])
    dense = dense_aggregate(one, client_weights(one), name, torch.float64)  # (m, n)
    out = {}
    for basis in ("qr", "svd"):
        g = make_aggregator("florist", policy=EnergyThreshold(1.0), basis=basis).aggregate(one)
        out[f"florist_{basis}_tau1_vs_dense"] = rel_err(g.global_update[name].delta(torch.float64), dense)
    r_max = max(u.modules[name].rank for u in one)
    best = make_aggregator("florist", policy=FixedRank(r_max)).aggregate(one).global_update[name]
    for path in ("flexlora", "peft_svd"):
        check = runs[path].check if path in runs else None
        if check is not None:
            out[f"{path}_rank{r_max}_vs_florist_rank{r_max}"] = rel_err(
                check.delta(torch.float64), best.delta()
            )
    return out


def goals(sc: Scenario, rows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stated goals: >= 100x faster than each dense path (7B) and within ``sc.qr_bound_goal``
    (2x; 1.5x at 70B shapes) of the QR bound, on the medians; ``best`` is the same ratio of the
    ``best_seconds`` (fastest round per unit), reported beside it."""
    florist = rows["florist_qr"]["seconds"]
    out = {}
    if sc.speedup_goal:
        worst = min(rows[p]["seconds"] / florist for p in ("flexlora", "peft_svd"))
        out["speedup_vs_dense"] = {
            "target": f">= {SPEEDUP_GOAL:g}x",
            "value": worst,
            "met": worst >= SPEEDUP_GOAL,
        }
    ratio = florist / rows["qr_bound"]["seconds"]
    out["florist_over_qr_bound"] = {
        "target": f"<= {sc.qr_bound_goal:g}x",
        "value": ratio,
        "met": ratio <= sc.qr_bound_goal,
        "best": rows["florist_qr"]["best_seconds"] / rows["qr_bound"]["best_seconds"],
    }
    return out


# ---------------------------------------------------------------------------------------------- report


def add_ratios(rows: dict[str, Any], peaks: dict[str, dict[str, Any]]) -> None:
    florist, bound = rows["florist_qr"]["seconds"], rows["qr_bound"]["seconds"]
    for name, row in rows.items():
        row["over_florist"] = row["seconds"] / florist
        row["over_qr_bound"] = row["seconds"] / bound
        row.update(peaks[name])


def header(sc: Scenario, size: dict[str, Any]) -> str:
    m, n = size["shape"]
    ranks = f"{sc.ranks[0]} each" if len(set(sc.ranks)) == 1 else f"{list(sc.ranks)}"
    shapes = " ".join(f"{k} {a}x{b}" for k, (a, b) in sc.kinds.items())
    return (
        f"\n== {sc.name}: {sc.title}, {sc.layers} layers, {len(sc.modules())} modules ({shapes}); "
        f"K={len(sc.ranks)}, ranks {ranks} (R={sc.R})\n"
        f"   one {size['kind']} ({m}x{n}): stacks (m+n)·R·4 = {size['stacks_bytes'] / 2**20:.2f} MiB, "
        f"dense m·n·4 = {size['dense_bytes'] / 2**20:.2f} MiB"
    )


COLUMNS = ("path", "seconds", "modules timed", "÷ florist", "÷ QR bound", "peak extra MiB")
WIDTHS = (-26, 11, 14, 10, 11, 15)  # negative: left-aligned


def _cells(values: Sequence[str]) -> str:
    return " ".join(f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, w in zip(values, WIDTHS, strict=True))


MARKS = {"linear": "*", "flop model": "†", None: " "}  # extrapolation -> marker after "modules timed"


def table(rows: dict[str, Any]) -> str:
    lines = [_cells(COLUMNS)]
    for row in rows.values():
        timed = f"{row['measured_modules']}/{row['total_modules']}{MARKS[row['extrapolation']]}"
        peak = f"{row['peak_extra_mib']:.1f}{'‡' if row['peak_source'] == 'analytic' else ' '}"
        lines.append(
            _cells(
                (
                    row["label"],
                    f"{row['seconds']:.4f}",
                    timed,
                    f"{row['over_florist']:.1f}x",
                    f"{row['over_qr_bound']:.2f}x",
                    peak,
                )
            )
        )
    return "\n".join(lines + notes(rows))


def notes(rows: dict[str, Any]) -> list[str]:
    """Footnotes for the markers that ``rows`` use."""
    out = []
    if any(r["extrapolation"] == "linear" for r in rows.values()):
        out.append("* timed on the first modules only, extrapolated linearly to all modules")
    for r in rows.values():
        if r["extrapolation"] == "flop model":
            fm = r["flop_model"]
            out.append(
                f"† {r['label']}: timed on {fm['module']} (median {fm['measured_seconds']:.3f} s, of which "
                f"forming delta W {fm['form_seconds']:.3f} s), extrapolated to every module by the flop "
                f"model {fm['form_units']} (forming) + {fm['svd_units']} (dense SVD)"
            )
    if any(r["peak_source"] == "analytic" for r in rows.values()):
        out.append(
            "‡ analytic, not run: m·n·4 bytes of one dense delta W of the largest shape (a lower bound)"
        )
    return out


def footer(result: dict[str, Any], quick: bool) -> str:
    checks = ", ".join(f"{k} {v:.1e}" for k, v in result["correctness"].items())
    marks = [
        f"{k} {g['value']:.2f}x ({g['target']}: {'met' if g['met'] else 'NOT met'})"
        + (f" [fastest rounds: {g['best']:.2f}x]" if "best" in g else "")
        for k, g in result["goals"].items()
    ]
    r = result["florist_ranks_tau0.9"]
    skipped = "".join(f"{p}: {why}\n" for p, why in result["skipped_paths"].items())
    return skipped + (
        f"correctness (rel. Frobenius error, {result['check_module']}): {checks}\n"
        f"florist ranks at tau={TAU}: min {r['min']}, mean {r['mean']:.1f}, max {r['max']} "
        f"of R={result['R']}; "
        f"input validation of {result['built_modules']} modules (not in the times): "
        f"{result['validation_seconds']:.3f} s\n"
        f"goals: {'; '.join(marks)}"
        + (" (quick run: shapes reduced, the goals are for the full run)" if quick else "")
    )


# ---------------------------------------------------------------------------------------------- main


def bench_scenario(sc: Scenario, repeats: int) -> dict[str, Any]:
    """Times, correctness and goals of one scenario (memory is added later)."""
    built = sc.modules(sc.built_layers)  # the factors of every module some path is timed on
    print(f"[{sc.name}] building {len(built)} of {len(sc.modules())} modules x {len(sc.ranks)} clients")
    updates = make_updates(sc, built)
    rows, runs = time_scenario(sc, updates, repeats)
    ranks = runs["florist_qr"].ranks or [0]
    check = sc.module(0, sc.smallest_kind)
    return {
        "title": sc.title,
        "layers": sc.layers,
        "kinds": {k: list(v) for k, v in sc.kinds.items()},
        "modules": len(sc.modules()),
        "ranks": list(sc.ranks),
        "R": sc.R,
        "client_sizes": [client_size(k) for k in range(len(sc.ranks))],
        "analytic_one_module": analytic(sc),
        "timed_layers_fast_paths": sc.timed_layers,
        "built_modules": len(built),
        "paths": rows,
        "skipped_paths": sc.skipped(),
        "check_module": check,
        "correctness": correctness(updates, runs, check),
        "florist_ranks_tau0.9": {"min": min(ranks), "mean": statistics.mean(ranks), "max": max(ranks)},
        "validation_seconds": validation_seconds(updates),
        "goals": goals(sc, rows),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 7B shapes / 4, 70B / 16")
    p.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    return p.parse_args(argv)


def select(scs: list[Scenario], names: str) -> list[Scenario]:
    """The scenarios named in ``names`` (comma-separated; empty: all), in ``scs`` order."""
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {sc.name for sc in scs}
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; known: {[sc.name for sc in scs]}")
    return [sc for sc in scs if not wanted or sc.name in wanted]


def warn_if_busy() -> list[float]:
    """The load averages at the start; a warning when other work competes for the CPU."""
    load = list(os.getloadavg())
    if load[0] > BUSY_LOAD:
        print(f"warning: 1-minute load average {load[0]:.2f} on {os.cpu_count()} CPUs before the start; "
              "other work on this machine inflates and scatters the timings", flush=True)  # fmt: skip
    return load


def progress(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:.0f} s] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_imports()  # bitsandbytes' notice about an optional CPU kernel package (peft imports it)
    args = parse_args(argv)
    start, load = time.perf_counter(), warn_if_busy()
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    for path in PATHS.values():
        warm_up(path)
    scs = select(scenarios(args.quick), args.scenarios)
    results = {sc.name: bench_scenario(sc, REPEATS["quick" if args.quick else "full"]) for sc in scs}
    jobs = sum(measured(sc, p) for sc in scs for p in sc.paths())
    progress(start, f"peak memory: {jobs} spawned processes, {MEMORY_WORKERS} at a time")
    peaks = measure_peaks(scs)
    progress(start, "done")
    for sc in scs:
        add_ratios(results[sc.name]["paths"], {p: peaks[(sc.name, p)] for p in sc.paths()})
        print(header(sc, results[sc.name]["analytic_one_module"]))
        print(table(results[sc.name]["paths"]))
        print(footer(results[sc.name], args.quick))
    total = time.perf_counter() - start
    write_json_atomic(args.out, report(args, results, total, load))
    print(f"\ntotal {total:.1f} s; results written to {args.out}")
    return 0


def report(
    args: argparse.Namespace, results: dict[str, Any], total: float, load: list[float]
) -> dict[str, Any]:
    import peft

    return {
        "benchmark": "aggregation",
        "quick": args.quick,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "threads": THREADS,
        "seed": SEED,
        "tau": TAU,
        "repeats_fast_paths": REPEATS["quick" if args.quick else "full"],
        "fast_paths_interleaved": True,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": load,
        "peak_memory_method": "VmHWM growth in a fresh spawned process, one module of the largest shape; "
        "rows with peak_source 'analytic' are m n 4 bytes of one dense delta W (not run)",
        "scenarios": results,
        "total_seconds": total,
    }


if __name__ == "__main__":
    sys.exit(main())
