"""The fair headline's grid run as several ``florist bench`` processes at once (a GPU host), then merged.

    .venv/bin/python benchmarks/fair_parallel.py --out docs/results/fair --workers 2 [--deadline 0] [k=v ...]

Stage 1 runs every candidate configuration of every method (``CANDIDATES``) in both rank settings
with training seed 0; stage 2 runs the configuration each of the ``TOP`` methods chose on validation
(``florist.studies.fair.chosen``) with the seeds ``--more-seeds``; stage ``skills`` runs those
homogeneous choices once on the second task (``SKILLS_REGIME``: the skills set, one skill per client,
exact match; ``OUT/skills/skills.md``). Each stage's (seed, setting, variant)
jobs run ``--workers`` at a time, each a plain ``florist bench --seeds S --variants V`` writing into
its worker's output and cache folder under ``OUT/work/`` (one process per folder at a time, so they
never write the same file; the seeds stage starts FLoRIST's and the best baseline's jobs first); their
``results.json`` are merged into ``OUT/seed-S/results.json`` and ``florist.studies.fair`` writes
``OUT/fair.md``, ``fair.json`` and the curves. Every bench checkpoints each round, so the same
command continues a killed run (finished variants are skipped, a half-done one resumes at its last
round). On a 2-core CPU run two workers of one thread each (``OMP_NUM_THREADS=1``); on a GPU host
several share the GPU. A half-done job resumes on the worker whose cache holds its checkpoints; any
other job goes to its place in its (seed, setting)'s list, modulo ``--workers``.

Stage 1 starts a heterogeneous candidate as soon as its homogeneous run has finished and is on its
method's frontier there, beside the homogeneous runs still going (a candidate that a later
homogeneous run dominates has then run in vain, never unfairly: more candidates, chosen on validation).

The regime (``REGIME``): the packaged paper_cpu.toml (8 Dolly clients, q/v, shared init, lr 1e-3,
batch 4, max length 256, bf16 training, fp32 scoring), 10 rows per category withheld for validation,
8 steps per round (32 examples per client), 10 rounds, both splits scored after every round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from florist.fsutil import write_json_atomic
from florist.studies.fair import (
    OURS,
    choose,
    chosen,
    family,
    finished,
    frontier,
    write_fair_report,
    write_skills_report,
)
from florist.studies.headline import slug

REGIME = ("data.validation_per_label=10", "federation.rounds=10", "train.steps=8")
# stage 2 reruns these methods' validation choices with more seeds; the skills task runs them too
TOP = ("FLoRIST", "FlexLoRA", "FedIT", "FLoRA", "FedEx-LoRA")
# stage 2's seeds: the top methods and the two 2025 baselines, under the same rules as every method
SEEDED = (*TOP, "FedSVD", "Fed-SB")
# the second task: the embedded skills set, one skill per client (7), scored by exact match as well
SKILLS_REGIME = ("data.source='skills'", "data.split='by_label'", "data.test=none",
                 "federation.num_clients=7", "federation.rounds=10", "train.steps=8", "train.max_length=128",
                 "eval.max_new_tokens=12", "eval.batch_size=28")  # fmt: skip
SETTINGS = ("homogeneous", "heterogeneous")
CANDIDATES = {  # --extra-baselines specs and FLoRIST variant names, per the bench's naming
    "baselines": (
        "fedit+bf16",
        "flora+bf16",
        "flora+bf16+orth",
        "flora+bf16+orth+acc",
        "flexlora+bf16",
        "flexlora+bf16+uplink",
        "fedex+bf16",
        "fedsvd+bf16",
        "fedsb+bf16",
        "fedsb+bf16+r64",
        "flora+bf16+orth+uplink",
    ),
    "florist": (
        "all+orth",
        "all+orth+chg",
        "bf16+orth",
        "bf16+orth+acc",
        "all+orth+ef",
        "all+orth+acc+ef",
        "all+orth+acc+efr",
    ),
}
NAMES = (
    "FedIT +bf16",
    "FLoRA +bf16",
    "FLoRA +bf16 +orth",
    "FlexLoRA +bf16",
    "FlexLoRA +bf16 +uplink",
    "FedEx-LoRA +bf16",
    "FedSVD +bf16",
    "FLoRIST tau=0.90 +all +orth",
    "FLoRIST tau=0.90 +all +orth +chg",
    "FLoRIST tau=0.90 +bf16 +orth",
    "FLoRIST tau=0.90 +all +orth +ef",  # error feedback, FLoRIST's answer to what the ladder shows
    "Fed-SB +bf16",
    "Fed-SB +bf16 +r64",
    "FLoRA +bf16 +orth +acc",  # the ablation ladder's (florist.studies.fair.LADDER)
    "FLoRIST tau=0.90 +bf16 +orth +acc",
    "FLoRIST tau=0.90 +all +orth +acc +ef",  # the two remedies of the interim ladder together
    "FLoRIST tau=0.90 +all +orth +acc +efr",  # ... with the carry at the round's own rank: no more bytes
    "FLoRA +bf16 +orth +uplink",  # uplink thresholding, which FLoRA's server (it multiplies) admits
)  # appended only: a name's place sets its worker, whose cache holds its checkpoints
# Fed-SB trains one r x r core on every client: it has no heterogeneous-rank form (r 16 as the others'
# LoRA, and r 64; its rank is chosen on validation like any option)
HOMOGENEOUS_ONLY = ("Fed-SB +bf16", "Fed-SB +bf16 +r64")


def applies(setting: str, name: str) -> bool:
    return setting == "homogeneous" or name not in HOMOGENEOUS_ONLY


def heterogeneous_candidates(first: dict[int, Any], names: list[str], rounds: int) -> list[str]:
    """The candidates the heterogeneous setting runs: those on their method's homogeneous frontier
    (``florist.studies.fair.frontier``: no other configuration of the method had both a lower
    validation loss and fewer bytes there), in ``names``' order."""
    front = set(frontier(first, "homogeneous", rounds))
    return [v for v in names if applies("heterogeneous", v) and v in front]


def stage_one(first: dict[int, Any], setting: str, names: list[str], rounds: int) -> list[str]:
    """The candidates stage 1 runs in ``setting``."""
    if setting == "homogeneous":
        return names
    return heterogeneous_candidates(first, names, rounds)


def unfinished(first: dict[int, Any], setting: str, names: list[str], rounds: int) -> list[str]:
    """The ``names`` seed 0 has not finished in ``setting``."""
    done = finished(first, setting, rounds)
    return [v for v in names if v not in done]


def seeding_order(first: dict[int, Any], setting: str, rounds: int) -> list[str]:
    """The ``SEEDED`` methods' choices in ``setting`` (``florist.studies.fair.chosen``), in the order
    their seeds run: FLoRIST's first, then by seed 0's validation loss, the best baseline leading."""
    picks = {f: v for f, v in chosen(first, setting, rounds).items() if f in SEEDED}
    loss = choose(first, setting, rounds)[1]
    return sorted(picks.values(), key=lambda v: (family(v) != OURS, loss[v], v))


def bench_command(
    args: argparse.Namespace, seed: int, setting: str, variants: list[str], worker: str
) -> list[str]:
    return [
        sys.executable, "-m", "florist.cli", "bench", "--seeds", str(seed), "--settings", setting,
        "--variants", ",".join(variants), "--out", str(args.out / "work" / worker),
        "--cache", str(args.cache / worker), "--taus", "", "--hetero-taus", "", "--option-taus", "0.9",
        "--options", ",".join(CANDIDATES["florist"]), "--extra-baselines", ",".join(CANDIDATES["baselines"]),
        "--eval-every-round", *REGIME, *args.overrides,
    ]  # fmt: skip


def skills_command(args: argparse.Namespace, variants: list[str]) -> list[str]:
    """One seed of the chosen configurations on the skills task (``OUT/skills``), scored by exact
    match and held-out loss after the last round."""
    return [
        sys.executable, "-m", "florist.cli", "bench", "--settings", "homogeneous",
        "--variants", ",".join(variants), "--out", str(args.out / "skills"),
        "--cache", str(args.cache / "skills"), "--taus", "",
        "--hetero-taus", "", "--option-taus", "0.9", "--options", ",".join(CANDIDATES["florist"]),
        "--extra-baselines", ",".join(CANDIDATES["baselines"]), "--exact-match", *SKILLS_REGIME,
        *args.overrides,
    ]  # fmt: skip


def checkpoint_worker(args: argparse.Namespace, seed: int, setting: str, variant: str) -> int | None:
    """The worker whose cache holds checkpoints of this job (None: no worker has begun it)."""
    for folder in sorted(args.cache.glob(f"w*-{setting}")):
        rounds = folder / f"seed-{seed}" / setting / "variants" / slug(variant)
        if any(rounds.glob("round-*.pt")):
            return int(folder.name.split("-")[0][1:])
    return None


def run_stage(args: argparse.Namespace, jobs: list[tuple[int, str, str]], deadline: float) -> None:
    """(seed, setting, variant) jobs, one ``florist bench`` process each, at most ``args.workers`` at a
    time, until done or deadline.

    A job's worker (its output and cache folder) is the one whose cache holds its checkpoints
    (``checkpoint_worker``), else its place among the jobs of its (seed, setting) modulo
    ``--workers``; a job that any worker already finished (in the merged results) is left out. Jobs
    start in the order of their place, then setting, then seed, so the first of each (seed,
    setting)'s list (the seeds stage lists FLoRIST and the best baseline first) finish in every
    setting and seed before the rest; never two processes write one (worker, seed) folder at once."""
    if past(args, deadline):
        return
    merged = merge(args)
    rounds = rounds_of(args)
    place: dict[tuple[int, str], int] = {}
    done = {
        (seed, setting): finished({seed: merged.get(seed, {})}, setting, rounds) for seed, setting, _ in jobs
    }
    queue: list[tuple[int, int, str, int, str]] = []  # (place, seed, setting, worker, variant)
    for seed, setting, variant in jobs:
        i = place[(seed, setting)] = place.get((seed, setting), -1) + 1
        if variant not in done[(seed, setting)]:
            w = checkpoint_worker(args, seed, setting, variant)
            queue.append((i, seed, setting, i % args.workers if w is None else w, variant))
    queue.sort(key=lambda j: (j[0], SETTINGS.index(j[2]) if j[2] in SETTINGS else len(SETTINGS), j[1]))
    running: list[tuple[subprocess.Popen[bytes], Any, tuple[int, str, int]]] = []
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // args.workers))
    env = os.environ | {
        "OMP_NUM_THREADS": threads
    }  # a given OMP_NUM_THREADS wins (another study shares the cores)
    while queue or running:
        while len(running) < args.workers:
            busy = {key for _, _, key in running}
            job = next((j for j in queue if (j[1], j[2], j[3]) not in busy), None)
            if job is None:
                break
            queue.remove(job)
            _, seed, setting, w, variant = job
            worker = f"w{w}-{setting}"
            log = (args.out / "work" / f"{worker}-seed-{seed}.log").open("ab")
            cmd = bench_command(args, seed, setting, [variant], worker)
            print(f"start {worker} seed {seed}: {variant}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, log, (seed, setting, w)))
        time.sleep(2)
        if past(args, deadline):
            for proc, _, _ in running:
                proc.terminate()
            queue.clear()
        for item in list(running):
            if item[0].poll() is not None:
                item[1].close()
                running.remove(item)
                print(f"a worker ended with {item[0].returncode}", flush=True)


def rounds_of(args: argparse.Namespace) -> int:
    """The rounds every variant runs: 10, or a ``federation.rounds=`` override's."""
    rounds = 10
    for o in args.overrides:
        if o.startswith("federation.rounds="):
            rounds = int(o.split("=")[1])
    return rounds


def past(args: argparse.Namespace, deadline: float) -> bool:
    """Whether ``--deadline`` (0: none) has passed."""
    return bool(args.deadline) and time.time() > deadline


def run_until(cmd: list[str], log: Path, args: argparse.Namespace, deadline: float) -> int | None:
    """``cmd`` with its output appended to ``log``; stopped at the deadline (None: stopped or not run)."""
    if past(args, deadline):
        return None
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if past(args, deadline):
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:  # it ignored SIGTERM
                    proc.kill()
                    proc.wait()
                return None
            time.sleep(2)
    return proc.returncode


def merge(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Every worker's ``seed-S/results.json`` merged into ``OUT/seed-S/results.json``."""
    merged: dict[int, dict[str, Any]] = {}
    for path in sorted((args.out / "work").glob("*/seed-*/results.json")):
        seed = int(path.parent.name.split("-")[1])
        results = json.loads(path.read_text())
        into = merged.setdefault(seed, {})
        for key, value in results.items():
            if isinstance(value, dict) and key != "meta":
                into.setdefault(key, {}).update(value)
            else:
                into[key] = value
    for seed, results in merged.items():
        old = args.out / f"seed-{seed}" / "results.json"
        if old.is_file():  # keep what an earlier run finished
            for key, value in json.loads(old.read_text()).items():
                if isinstance(value, dict) and key != "meta":
                    results.setdefault(key, {}).update(
                        {k: v for k, v in value.items() if k not in results[key]}
                    )
        write_json_atomic(old, results)
    return merged


def select(args: argparse.Namespace, names: list[str], rounds: int, deadline: float) -> None:
    """Stage 1 with seed 0: every homogeneous candidate, and beside them each heterogeneous one whose
    homogeneous run is on its method's frontier; repeated while a finished homogeneous run adds
    heterogeneous candidates, until nothing is left or a pass finishes nothing (a failing job)."""
    left: list[tuple[int, str, str]] | None = None
    while not past(args, deadline):
        seed0 = {0: merge(args).get(0, {})}
        carried = heterogeneous_candidates(seed0, names, rounds)
        print(f"heterogeneous candidates (the homogeneous frontier so far): {carried}", flush=True)
        jobs = [(0, "homogeneous", v) for v in names] + [(0, "heterogeneous", v) for v in carried]
        now = [j for j in jobs if j[2] in unfinished(seed0, j[1], [j[2]], rounds)]
        if not now or now == left:
            if now:
                print(f"stage 1: these did not finish (see their logs): {now}", flush=True)
            return
        left = now
        run_stage(args, jobs, deadline)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="more section.key=value overrides (a smoke run, say)")
    p.add_argument("--out", type=Path, default=Path("docs/results/fair"))
    p.add_argument("--cache", type=Path, default=Path("runs/fair-cache"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--more-seeds", default="1,2", help="seeds for the chosen configurations")
    p.add_argument(
        "--deadline", type=float, default=0, help="seconds after which workers are stopped (0: none)"
    )
    p.add_argument("--stage", choices=("all", "select", "seeds", "skills", "report"), default="all")
    p.add_argument("--names", default=",".join(NAMES), help="candidates to run (a smoke run: fewer)")
    args = p.parse_args()
    deadline = time.time() + args.deadline
    (args.out / "work").mkdir(parents=True, exist_ok=True)
    rounds = rounds_of(args)
    names = [n for n in args.names.split(",") if n]
    if args.stage in ("all", "select"):
        select(args, names, rounds, deadline)
    per_seed = merge(args)
    first = {0: per_seed[0]} if 0 in per_seed else {}  # the choice is seed 0's (``chosen``)
    picks = {s: seeding_order(first, s, rounds) for s in SETTINGS}
    ready = []  # the settings whose stage-1 candidates have all finished (heterogeneous: after homogeneous)
    for s in SETTINGS:
        if unfinished(first, s, stage_one(first, s, names, rounds), rounds):
            break
        ready.append(s)
    if args.stage in ("all", "seeds") and 0 in per_seed:
        print(f"chosen on validation (seed 0), rerun with seeds {args.more_seeds}: {picks}; "
              f"settings whose candidates have all finished: {ready}", flush=True)  # fmt: skip
        seeds = [int(x) for x in args.more_seeds.split(",") if x]
        run_stage(args, [(seed, s, v) for seed in seeds for s in ready for v in picks[s]], deadline)
        merge(args)
    if args.stage in ("all", "skills"):
        picks["homogeneous"] = [v for v in picks["homogeneous"] if family(v) in TOP]
        if "homogeneous" not in ready or len(picks["homogeneous"]) < len(TOP):
            print(
                f"skills task: waits for every top method's choice, have {picks['homogeneous']}", flush=True
            )
        else:
            cmd = skills_command(args, picks["homogeneous"])
            code = run_until(cmd, args.out / "work" / "skills.log", args, deadline)
            if code == 0:
                write_skills_report(args.out / "skills")
            elif code is None:
                print("skills task: stopped at --deadline; rerun to continue", flush=True)
            else:
                print(f"skills task: the bench ended with {code} (see work/skills.log); rerun to continue")
    write_fair_report(args.out, SETTINGS, rounds)
    print((args.out / "fair.md").read_text())


if __name__ == "__main__":
    main()
