"""Does bf16 autocast cost accuracy? The same federation trained in fp32 and in bf16, compared paired.

    .venv/bin/python benchmarks/precision_accuracy.py [--parts dolly,skills] [--dolly-steps 10] [--fresh]

dolly   The paper's 8 Dolly clients (../shared/data/dolly-8clients), one round of ``--dolly-steps``
        steps of batch 4 (max length 256, loss on the response, LoRA r=16 on q_proj and v_proj), the
        exact aggregate (FLoRIST at tau = 1) merged into the base. Trained once with
        ``train.precision = fp32`` and once with ``bf16``, same data, seeds and budget; both global
        models scored on the 80 held-out rows, each in fp32 (so only the training precision differs)
        and the bf16-trained one also under bf16 autocast (the ``auto`` path end to end). Prints the
        paired held-out loss differences with 95 % intervals clustered by row.
skills  The ``make demo`` federation (src/florist/configs/demo.toml: 4 clients, ranks 16/12/8/4,
        3 rounds, FLoRIST tau = 0.9), in-process, once all fp32 and once all bf16 (training and
        evaluation): exact match of the final global model, and on how many rows the answers differ.

Each part's result is written to the JSON (``--out``) as soon as it is done, and a rerun skips the
parts already there (``--fresh`` starts over), so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from florist.config import DEMO_CONFIG, FloristConfig, load_config
from florist.data.federated import test_examples
from florist.eval import exact_match
from florist.eval.heldout import LossResult, heldout_loss
from florist.eval.paired import paired_difference
from florist.fsutil import write_json_atomic
from florist.precision import Precision, resolve
from florist.studies.simulate import run_variant

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "precision_accuracy.json"
DOLLY = ROOT.parent / "shared" / "data" / "dolly-8clients"
PRECISIONS = ("fp32", "bf16")


def dolly_config(steps: int) -> FloristConfig:
    return load_config(
        None,
        [
            f"data.source={str(DOLLY)!r}", "data.split='presplit'", f"data.test={str(DOLLY / 'test.json')!r}",
            "data.max_examples_per_client='none'", "federation.num_clients=8", "federation.rounds=1",
            "lora.ranks=[16]", "lora.alpha=32.0", "train.lr=1e-3", f"train.steps={steps}",
            "train.batch_size=4", "train.max_length=256", "aggregation.method='florist'",
            "aggregation.tau=1.0", "run.progress=false",
        ],
    )  # fmt: skip


def final_model_scores(cfg: FloristConfig, score: Callable[[Any, Any], None]) -> None:
    """Train ``cfg`` in-process (florist.studies.simulate); ``score(model, tok)`` after the last round."""
    rounds_seen = 0

    def evaluate(model: Any, tok: Any) -> dict[str, float]:
        nonlocal rounds_seen
        rounds_seen += 1
        if rounds_seen == cfg.federation.rounds:
            score(model, tok)
        return {}

    run_variant(cfg, evaluate)


def dolly_part(args: argparse.Namespace) -> dict[str, Any]:
    if not DOLLY.exists():
        raise SystemExit(f"the dolly part needs {DOLLY} (see ../shared/data/README.md)")
    test = test_examples(dolly_config(args.dolly_steps).data)
    losses: dict[str, LossResult] = {}
    for prec in PRECISIONS:
        cfg = dolly_config(args.dolly_steps)
        cfg = replace(cfg, train=replace(cfg.train, precision=prec))
        start = time.perf_counter()

        def score(model: Any, tok: Any, prec: str = prec) -> None:
            losses[prec] = heldout_loss(model, tok, test, 256, 8, progress=False)
            if prec == "bf16":
                with Precision("bf16", "cpu", "benchmark").autocast():
                    losses["bf16 eval bf16"] = heldout_loss(model, tok, test, 256, 8, progress=False)

        final_model_scores(cfg, score)
        print(f"dolly, trained in {prec}: {time.perf_counter() - start:.0f} s, loss {losses[prec].loss:.5f}")
    return {
        "config": {"steps": args.dolly_steps, "batch_size": 4, "max_length": 256, "clients": 8, "rounds": 1},
        "heldout_loss": {name: r.loss for name, r in losses.items()},
        "paired": {
            "train bf16 - train fp32 (both scored in fp32)": paired_difference(
                losses["fp32"], losses["bf16"]
            ).to_dict(),
            "bf16 end to end - fp32 end to end": paired_difference(
                losses["fp32"], losses["bf16 eval bf16"]
            ).to_dict(),
            "eval bf16 - eval fp32 (same bf16-trained model)": paired_difference(
                losses["bf16"], losses["bf16 eval bf16"]
            ).to_dict(),
        },
    }


def skills_part(args: argparse.Namespace) -> dict[str, Any]:
    answers: dict[str, list[str]] = {}
    accuracy: dict[str, float] = {}
    for prec in PRECISIONS:
        cfg = load_config(DEMO_CONFIG, [f"train.precision='{prec}'", "run.progress=false"])
        start = time.perf_counter()

        def score(model: Any, tok: Any, prec: str = prec, cfg: FloristConfig = cfg) -> None:
            test = test_examples(cfg.data)
            with Precision(prec, "cpu", "benchmark").autocast():
                em = exact_match(model, tok, test, cfg.eval.max_new_tokens, cfg.eval.batch_size, False)
            answers[prec] = [p.answer for p in em.predictions]
            accuracy[prec] = em.accuracy

        final_model_scores(cfg, score)
        print(f"skills demo in {prec}: {time.perf_counter() - start:.0f} s, exact match {accuracy[prec]:.4f}")
    differ = sum(a != b for a, b in zip(answers["fp32"], answers["bf16"], strict=True))
    return {"exact_match": accuracy, "rows": len(answers["fp32"]), "answers_that_differ": differ}


def report(results: dict[str, Any]) -> None:
    if "dolly" in results:
        d = results["dolly"]
        c = d["config"]
        print(
            f"\nDolly, 8 clients x 1 round x {c['steps']} steps of batch {c['batch_size']}, exact aggregate; "
            f"held-out loss on 80 rows"
        )
        for name, loss in d["heldout_loss"].items():
            print(f"  {name:<16}{loss:.5f}")
        for name, p in d["paired"].items():
            inside = "zero inside" if p["low"] <= 0 <= p["high"] else "zero outside"
            print(f"  {name:<50}{p['mean']:+.5f}  95% CI [{p['low']:+.5f}, {p['high']:+.5f}]  ({inside})")
    if "skills" in results:
        s = results["skills"]
        em = s["exact_match"]
        print(
            f"\nskills demo: exact match fp32 {em['fp32']:.4f}, bf16 {em['bf16']:.4f} "
            f"({s['answers_that_differ']} of {s['rows']} answers differ)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="dolly,skills")
    p.add_argument("--dolly-steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="ignore parts already in --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    print(f"this machine: {resolve('auto', 'cpu').describe()}")
    results: dict[str, Any] = {}
    if args.out.exists() and not args.fresh:
        results = json.loads(args.out.read_text())
    parts = {"dolly": dolly_part, "skills": skills_part}
    for name in args.parts.split(","):
        if name in results:
            print(f"{name}: already in {args.out} (--fresh to redo)")
            continue
        results[name] = parts[name](args)
        write_json_atomic(args.out, results)
    report(results)


if __name__ == "__main__":
    main()
