"""Server aggregation cost: FLoRIST against the dense paths and the QR lower bound, in one run.

Run from the repository root:

    .venv/bin/python benchmarks/aggregation.py [--quick] [--out results.json]

It prints one table per scenario and writes every number to JSON (default
``benchmarks/results/aggregation.json``). ``--quick`` is a smoke run (under a minute): 2 layers
per scenario and the LLaMA-7B shapes divided by 4, so its numbers are not the real ones.

Paths, per adapted matrix ``W: (m, n)``, K clients, ``R = sum_k r_k``:

- ``florist (qr)``: ``make_aggregator("florist", policy=EnergyThreshold(0.9))``; QRs of the stacks
  ``B_stack (m, R)`` and ``A_stack^T (n, R)``, SVD of the ``R x R`` core; O((m + n) R^2) time and
  O((m + n) R) memory, never an ``(m, n)`` matrix.
- ``florist (svd)``: the same with ``basis="svd"`` (the paper's literal thin-SVD pipeline).
- ``flexlora``: ``make_aggregator("flexlora")``: dense ``delta W = sum_k p_k B_k A_k`` ``(m, n)``
  and a full ``torch.linalg.svd``; O(m n min(m, n)) time, O(m n) memory.
- ``peft svd``: peft's ``add_weighted_adapter(combination_type="svd")`` on a tiny ``torch.nn`` model
  with the scenario's Linear shapes and one adapter per client (its own rank and scaling).
- ``QR lower bound``: only ``torch.linalg.qr`` of both stacks (built beforehand, untimed); any
  method that finds orthonormal bases of the two stacks pays at least this.

Timing: florist and the QR bound run on every module, ``REPEATS`` times, median reported. The dense
paths (flexlora, peft) are timed once on the first ``dense_layers`` layers and extrapolated linearly
to all layers (every layer has the same shapes); the table marks those rows with ``*``.
Aggregator times are ``AggregationResult.seconds`` (input validation, shared by every aggregator,
is timed apart). Peak extra memory: each path runs in a fresh spawned process on ONE module of the
scenario's largest shape; the peak RSS (``VmHWM``, reset to the current RSS once the inputs are
built) is read before and after the path ran. ``ru_maxrss`` is not used: Linux carries it across
exec, so a spawned child starts at its parent's peak. All factors are float32, random, from a fixed
seed; torch uses 2 threads.
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
QR_BOUND_GOAL = 2.0  # florist within this factor of the QR lower bound
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "aggregation.json"

SMOLLM2_ATTN = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
LLAMA7B_QV = {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}


# ---------------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """Adapted modules ``model.layers.{i}.self_attn.{kind}`` with ``W: (m, n)`` and client ranks."""

    name: str
    title: str
    kinds: dict[str, tuple[int, int]]  # kind -> (m, n) = (out, in) of the adapted weight
    layers: int
    ranks: tuple[int, ...]  # r_k per client, in client-id order
    dense_layers: int  # layers the dense paths are timed on (then extrapolated)
    speedup_goal: bool = False  # is the >= 100x goal stated for this scenario?

    def modules(self, layers: int | None = None) -> list[str]:
        n = self.layers if layers is None else layers
        return [f"model.layers.{i}.self_attn.{kind}" for i in range(n) for kind in self.kinds]

    @property
    def R(self) -> int:
        return sum(self.ranks)

    @property
    def largest_kind(self) -> str:
        return max(self.kinds, key=lambda k: self.kinds[k][0] * self.kinds[k][1])


def scenarios(quick: bool) -> list[Scenario]:
    """(a) SmolLM2-135M attention, (b) LLaMA-7B q/v at r = 16, (c) the same with mixed ranks.

    The dense paths are timed on all SmolLM2 layers and on one LLaMA-7B layer (2 of 64 modules).
    ``quick``: 2 layers each and the LLaMA-7B shapes divided by 4.
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
    ]


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
        updates.append(ClientUpdate(f"client-{k}", CLIENT_SIZES[k % len(CLIENT_SIZES)], factors))
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
    """An ``nn.Module`` whose Linears are named ``model.layers.{i}.self_attn.{kind}``."""
    blocks = nn.ModuleList()
    for _ in range(layers):
        block, block.self_attn = nn.Module(), nn.Module()
        for kind, (m, n) in kinds.items():
            setattr(block.self_attn, kind, _linear(m, n))
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


def aggregator_path(label: str, method: str, options: dict[str, Any], dense: bool = False) -> PathSpec:
    return PathSpec(label, dense, _identity, partial(run_aggregator, method, options))


PATHS: dict[str, PathSpec] = {
    "florist_qr": aggregator_path("florist (qr, tau=0.9)", "florist", {"policy": EnergyThreshold(TAU)}),
    "florist_svd": aggregator_path(
        "florist (svd basis)", "florist", {"policy": EnergyThreshold(TAU), "basis": "svd"}
    ),
    "flexlora": aggregator_path("flexlora (dense + svd)", "flexlora", {}, dense=True),
    "peft_svd": PathSpec("peft add_weighted (svd)", True, prepare_peft, peft_svd),
    "qr_bound": PathSpec("QR lower bound", False, prepare_stacks, qr_bound),
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


def time_scenario(
    sc: Scenario, updates: list[ClientUpdate], repeats: int
) -> tuple[dict[str, Any], dict[str, Run]]:
    """Every path on ``sc``: seconds (extrapolated for dense paths), modules timed, samples."""
    rows, runs = {}, {}
    total = len(sc.modules())
    for name, path in PATHS.items():
        timed = sc.modules(sc.dense_layers) if path.dense else sc.modules()
        samples, runs[name] = time_path(path, restrict(updates, timed), 1 if path.dense else repeats)
        rows[name] = {
            "label": path.label,
            "seconds": statistics.median(samples) * total / len(timed),
            "samples": samples,
            "measured_modules": len(timed),
            "total_modules": total,
            "extrapolated": len(timed) < total,
        }
        print(f"  timed {path.label:<26} {rows[name]['seconds']:10.3f} s", flush=True)
    return rows, runs


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
    state = path.prepare(make_updates(sc, [f"model.layers.0.self_attn.{sc.largest_kind}"]))
    reset = reset_peak()
    before = _status_mib("VmHWM")
    path.execute(state)
    after = _status_mib("VmHWM")
    return {"baseline_mib": before, "peak_extra_mib": after - before, "peak_reset": reset}


def measure_peaks(scs: Sequence[Scenario]) -> dict[tuple[str, str], dict[str, Any]]:
    """``peak_worker`` for every scenario and path, each in its own spawned process."""
    ctx = mp.get_context("spawn")
    jobs = [(sc, p) for sc in scs for p in PATHS]
    with ProcessPoolExecutor(MEMORY_WORKERS, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {(sc.name, p): pool.submit(peak_worker, sc, p) for sc, p in jobs}
        return {key: f.result() for key, f in futures.items()}


def analytic(sc: Scenario) -> dict[str, Any]:
    """Sizes of one largest module: both stacks ``(m + n) R`` and the dense ``m n``, float32."""
    m, n = sc.kinds[sc.largest_kind]
    stacks, dense = (m + n) * sc.R * 4, m * n * 4
    return {"kind": sc.largest_kind, "shape": [m, n], "R": sc.R, "stacks_bytes": stacks, "dense_bytes": dense}


# ---------------------------------------------------------------------------------------------- checks


rel_err = relative_error  # ``||got - want||_F / ||want||_F`` in float64 (florist.lora.distance)


def correctness(updates: list[ClientUpdate], runs: dict[str, Run]) -> dict[str, float]:
    """On the first module: florist at tau = 1 against the dense sum, and the dense paths' rank-r_max
    truncations against florist's ``FixedRank(r_max)`` (both are the best rank-r_max approximation)."""
    name = first_module(updates)
    one = restrict(updates, [name])
    dense = dense_aggregate(one, client_weights(one), name, torch.float64)  # (m, n)
    out = {}
    for basis in ("qr", "svd"):
        g = make_aggregator("florist", policy=EnergyThreshold(1.0), basis=basis).aggregate(one)
        out[f"florist_{basis}_tau1_vs_dense"] = rel_err(g.global_update[name].delta(torch.float64), dense)
    r_max = max(u.modules[name].rank for u in one)
    best = make_aggregator("florist", policy=FixedRank(r_max)).aggregate(one).global_update[name]
    for path in ("flexlora", "peft_svd"):
        check = runs[path].check
        if check is not None:
            out[f"{path}_rank{r_max}_vs_florist_rank{r_max}"] = rel_err(
                check.delta(torch.float64), best.delta()
            )
    return out


def goals(sc: Scenario, rows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stated goals: >= 100x faster than each dense path (7B) and within 2x of the QR bound."""
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
        "target": f"<= {QR_BOUND_GOAL:g}x",
        "value": ratio,
        "met": ratio <= QR_BOUND_GOAL,
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


def table(rows: dict[str, Any]) -> str:
    lines = [_cells(COLUMNS)]
    for row in rows.values():
        timed = f"{row['measured_modules']}/{row['total_modules']}{'*' if row['extrapolated'] else ' '}"
        lines.append(
            _cells(
                (
                    row["label"],
                    f"{row['seconds']:.4f}",
                    timed,
                    f"{row['over_florist']:.1f}x",
                    f"{row['over_qr_bound']:.2f}x",
                    f"{row['peak_extra_mib']:.1f}",
                )
            )
        )
    if any(r["extrapolated"] for r in rows.values()):
        lines.append("* timed on the first modules only, extrapolated linearly to all modules")
    return "\n".join(lines)


def footer(result: dict[str, Any], quick: bool) -> str:
    checks = ", ".join(f"{k} {v:.1e}" for k, v in result["correctness"].items())
    marks = [
        f"{k} {g['value']:.2f}x ({g['target']}: {'met' if g['met'] else 'NOT met'})"
        for k, g in result["goals"].items()
    ]
    r = result["florist_ranks_tau0.9"]
    return (
        f"correctness (rel. Frobenius error, {result['check_module']}): {checks}\n"
        f"florist ranks at tau={TAU}: min {r['min']}, mean {r['mean']:.1f}, max {r['max']} "
        f"of R={result['R']}; "
        f"input validation (not in the times): {result['validation_seconds']:.3f} s\n"
        f"goals: {'; '.join(marks)}"
        + (" (quick run: shapes reduced, the goals are for the full run)" if quick else "")
    )


# ---------------------------------------------------------------------------------------------- main


def bench_scenario(sc: Scenario, repeats: int) -> dict[str, Any]:
    """Times, correctness and goals of one scenario (memory is added later)."""
    print(f"[{sc.name}] building {len(sc.modules())} modules x {len(sc.ranks)} clients", flush=True)
    updates = make_updates(sc, sc.modules())
    rows, runs = time_scenario(sc, updates, repeats)
    ranks = runs["florist_qr"].ranks or [0]
    return {
        "title": sc.title,
        "layers": sc.layers,
        "kinds": {k: list(v) for k, v in sc.kinds.items()},
        "modules": len(sc.modules()),
        "ranks": list(sc.ranks),
        "R": sc.R,
        "client_sizes": list(CLIENT_SIZES[: len(sc.ranks)]),
        "analytic_one_module": analytic(sc),
        "paths": rows,
        "check_module": first_module(updates),
        "correctness": correctness(updates, runs),
        "florist_ranks_tau0.9": {"min": min(ranks), "mean": statistics.mean(ranks), "max": max(ranks)},
        "validation_seconds": validation_seconds(updates),
        "goals": goals(sc, rows),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 7B shapes / 4")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    return p.parse_args(argv)


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
    args = parse_args(argv)
    start, load = time.perf_counter(), warn_if_busy()
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    for path in PATHS.values():
        warm_up(path)
    scs = scenarios(args.quick)
    results = {sc.name: bench_scenario(sc, REPEATS["quick" if args.quick else "full"]) for sc in scs}
    progress(start, f"peak memory: {len(scs) * len(PATHS)} spawned processes, {MEMORY_WORKERS} at a time")
    peaks = measure_peaks(scs)
    progress(start, "done")
    for sc in scs:
        add_ratios(results[sc.name]["paths"], {p: peaks[(sc.name, p)] for p in PATHS})
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
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": load,
        "peak_memory_method": "VmHWM growth in a fresh spawned process, one module of the largest shape",
        "scenarios": results,
        "total_seconds": total,
    }


if __name__ == "__main__":
    sys.exit(main())
