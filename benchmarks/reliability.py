"""Reliability scenarios, measured: prints one row per scenario and writes JSON.

    .venv/bin/python benchmarks/reliability.py [--out benchmarks/results/reliability.json]

On a tiny random Llama (Flower simulation runtime where a round is involved; the strategy on
fabricated replies for bad updates and clipping): rounds completed, clients left out, and the
deviation of each round's global update from its reference (relative Frobenius norm of the product
difference). The SIGKILL/resume and TLS deployment scenarios are multi-process tests
(tests/integration/test_resume.py, test_deploy.py); their figures come from those runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.flower_helpers import save_tiny_model, tiny_run_config  # noqa: E402
from tests.integration.test_reliability import records, survivors_dense  # noqa: E402
from tests.unit import test_strategy_reliability as fab  # noqa: E402

from florist.client.faults import dropped_clients  # noqa: E402
from florist.errors import QuorumLost  # noqa: E402
from florist.flower.simulation import run_simulation  # noqa: E402
from florist.lora.distance import relative_error  # noqa: E402
from florist.lora.peft_io import read_adapter  # noqa: E402

deviation = relative_error  # sqrt(sum ||got - want||^2 / sum ||want||^2) over modules


def dropout(model: Path, tmp: Path) -> dict[str, Any]:
    cfg = tiny_run_config(
        model,
        tmp,
        "dropout",
        "federation.num_clients=10",
        "federation.rounds=3",
        "lora.ranks=[4]",
        "aggregation.tau=1.0",
        "faults.drop_fraction=0.3",
        "faults.seed=7",
        "eval.every=0",
        "data.skills_train=20",
    )
    summary = run_simulation(cfg)
    run, devs, out = Path(summary["run_dir"]), [], []
    for r in records(run)[1:]:
        d = run / "rounds" / f"round-{r['round']:03d}"
        got = {k: f.delta(torch.float64) for k, f in read_adapter(d / "adapter").modules.items()}
        devs.append(deviation(got, survivors_dense(d)))
        out.append(sorted(r["rejected"]))
        assert sorted(r["rejected"]) == [
            f"client-{k:03d}" for k in dropped_clients(cfg.faults, r["round"], 10)
        ]
    return {
        "scenario": "dropout 30% of 10 clients",
        "rounds": f"{summary['rounds']}/3",
        "left_out": out,
        "deviation": max(devs),
        "reference": "dense sum over survivors, weights renormalised",
    }


def quorum(model: Path, tmp: Path) -> dict[str, Any]:
    cfg = tiny_run_config(
        model,
        tmp,
        "quorum",
        "federation.rounds=3",
        "federation.min_replies=2",
        "federation.max_skipped_rounds=2",
        "faults.drop_fraction=0.6",
        "eval.every=0",
    )
    try:
        run_simulation(cfg)
        stopped = "no"
    except QuorumLost as err:
        stopped = str(err).split(";")[0]
    lines = records(tmp / "quorum")
    return {
        "scenario": "quorum: 1 of 3 survives, min_replies 2",
        "rounds": f"0/3 ({len(lines) - 1} skipped)",
        "left_out": [sorted(r["rejected"]) for r in lines[1:]],
        "deviation": 0.0 if not (tmp / "quorum" / "rounds").exists() else None,
        "reference": "global model unchanged",
        "stopped": stopped,
        "checkpoint": sorted(p.name for p in (tmp / "quorum" / "checkpoints").glob("*.pt")),
    }


def straggler(model: Path, tmp: Path) -> dict[str, Any]:
    cfg = tiny_run_config(
        model,
        tmp,
        "straggler",
        "federation.rounds=3",
        "federation.round_timeout=10.0",
        "federation.cpus_per_client=1.0",
        "faults.slow_clients=[1]",
        "faults.slow_rounds=[2]",
        "faults.slow_seconds=14.0",
        "eval.every=0",
    )
    summary = run_simulation(cfg)
    lines = records(Path(summary["run_dir"]))
    return {
        "scenario": "straggler: client-001 stalls 14 s in round 2, timeout 10 s",
        "rounds": f"{summary['rounds']}/3",
        "left_out": [r["timed_out"] for r in lines[1:]],
        "late_replies": summary["late_replies"],
        "deviation": None,
        "reference": "all digests equal the server's"
        if summary["sync"]["clients_match_server"]
        else "DIGESTS DIFFER",
    }


def bad_updates() -> list[dict[str, Any]]:
    shapes = fab.adapted_shapes(fab.tiny_llama(0), ("q_proj", "v_proj"))
    rows = []
    module = "model.layers.1.self_attn.v_proj"
    for case in sorted(fab.BAD):
        corrupt, n, _ = fab.BAD[case]
        s = fab.strategy(shapes)
        ups = [fab.honest(shapes, k, common=1.0) for k in range(fab.N)]
        replies = (
            [fab.reply(u) for u in ups[:2]]
            + [fab.reply(corrupt(ups[2], module), n=n)]
            + [fab.reply(u) for u in ups[3:]]
        )
        s.aggregate_train(1, replies)
        want = fab.dense([u for u in ups if u.client_id != "client-002"])
        rows.append(
            {
                "scenario": f"bad update: {case}",
                "rounds": "1/1",
                "left_out": sorted(s.logs[1].rejected),
                "deviation": deviation(fab.products(s), want),
                "reason": s.logs[1].rejected["client-002"],
            }
        )
    return rows


def clipping() -> list[dict[str, Any]]:
    from florist.aggregation.robust import update_norm

    shapes = fab.adapted_shapes(fab.tiny_llama(0), ("q_proj", "v_proj"))
    ups = [fab.honest(shapes, k, common=3.0) for k in range(8)]
    bad = replace(ups[2], modules={n: replace(f, B=f.B * 1e6) for n, f in ups[2].modules.items()})
    attacked = [*ups[:2], bad, *ups[3:]]
    rows = []
    for label, over in (
        ("off", []),
        ("median x1.0", ["aggregation.clip='median'"]),
        (
            "fixed 1.5 x max honest",
            ["aggregation.clip='fixed'", f"aggregation.clip_value={1.5 * max(map(update_norm, ups))}"],
        ),
    ):
        dev = deviation(
            fab.run_round(fab.strategy(shapes, *over, n=8), attacked),
            fab.run_round(fab.strategy(shapes, *over, n=8), ups),
        )
        rows.append(
            {
                "scenario": f"robust: client-002 x 1e6, clipping {label}",
                "rounds": "1/1",
                "left_out": [],
                "deviation": dev,
                "reference": "same server, client-002 honest",
            }
        )
    return rows


def size_guard() -> dict[str, Any]:
    from tests.unit.test_exchange_and_sizes import llama_7b_shapes

    from florist.server.size_guard import MessageTooLarge, check_estimate, estimate

    try:
        check_estimate(estimate("flora", llama_7b_shapes(), [64] * 64), "flora", 512.0, 64)
        text = "accepted"
    except MessageTooLarge as err:
        text = str(err)
    return {
        "scenario": "size guard: FLoRA, 64 clients r=64, Llama-2-7B q,v",
        "rounds": "refused",
        "left_out": [],
        "deviation": None,
        "reason": text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        model = save_tiny_model(tmp / "tiny")
        rows = [
            dropout(model, tmp),
            quorum(model, tmp),
            straggler(model, tmp),
            *bad_updates(),
            *clipping(),
            size_guard(),
        ]
    for r in rows:
        dev = "-" if r["deviation"] is None else f"{r['deviation']:.2e}"
        extra = r.get("reason") or r.get("reference") or ""
        print(f"| {r['scenario']} | {r['rounds']} | {r['left_out']} | {dev} | {extra} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
