"""Packed batches cost nothing in accuracy: the headline's round 1 trained with packed and with padded
batches, the same examples in the same order for the same steps, scored on the same held-out rows.

    .venv/bin/python benchmarks/packing_check.py [--out docs/results/packing-check] [k=v ...]

Two ``florist bench`` runs (homogeneous ranks, the packaged paper_cpu.toml regime, one round) of FLoRA
and FLoRIST tau = 0.9, one with ``train.batching = "padded"``, one with ``"packed"`` (each with its
own round-1 cache: the training differs), both scored with the same evaluator. Prints, per variant,
the paired held-out loss difference packed - padded with its 95 % interval, and each bench's wall
seconds (round 1's training of the 8 clients and the scoring; run it on a fresh --out so round 1 is
trained, not read from a cache); writes ``OUT/check.json``. Dropout masks are drawn per tensor, so the
two runs differ by dropout's draws and float rounding, not by the function trained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from florist.eval.paired import paired_difference
from florist.fsutil import write_json_atomic
from florist.studies.headline import Bench, BenchOptions
from florist.studies.report import loss_of

VARIANTS = ("FLoRA", "FLoRIST tau=0.90")


def run(out: Path, batching: str, overrides: list[str]) -> dict[str, Any]:
    opts = BenchOptions(
        overrides=(f"train.batching='{batching}'", "federation.rounds=1", *overrides),
        out=str(out / batching), cache=str(out / f"cache-{batching}"), taus=(0.9,), hetero_taus=(),
        option_taus=(), hetero_option_taus=(), options=(), extra_baselines=(), settings=("homogeneous",),
        variants=VARIANTS,
    )  # fmt: skip
    Bench(opts).run()
    results: dict[str, Any] = json.loads((out / batching / "results.json").read_text())["homogeneous"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="more section.key=value overrides")
    p.add_argument("--out", type=Path, default=Path("docs/results/packing-check"))
    args = p.parse_args()
    runs, seconds = {}, {}
    for b in ("padded", "packed"):
        start = time.perf_counter()
        runs[b] = run(args.out, b, args.overrides)
        seconds[b] = time.perf_counter() - start
    check: dict[str, Any] = {"bench_seconds": seconds}
    print(f"bench wall seconds (round-1 training of 8 clients, 2 variants scored): {seconds}")
    for name in VARIANTS:
        padded, packed = (loss_of(runs[b][name][-1]["eval"]) for b in ("padded", "packed"))
        assert padded is not None and packed is not None
        d = paired_difference(padded, packed)
        check[name] = {"padded": padded.loss, "packed": packed.loss, "packed_minus_padded": d.to_dict()}
        print(
            f"{name:<20} padded {padded.loss:.4f}  packed {packed.loss:.4f}  packed - padded {d.describe()}"
        )
    write_json_atomic(args.out / "check.json", check)


if __name__ == "__main__":
    main()
