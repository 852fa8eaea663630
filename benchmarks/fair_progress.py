"""Where the fair headline's grid stands: every variant checkpoint under the cache, its rounds done,
and per round its scored loss and bytes, as ``progress.json`` (small, committed while the grid runs).

    .venv/bin/python benchmarks/fair_progress.py --cache runs/fair-cache --out docs/results/fair/progress.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from florist.server import checkpoint


def progress(cache: Path) -> list[dict[str, Any]]:
    out = []
    for folder in sorted(cache.glob("*/seed-*/*/variants/*")):
        found = checkpoint.checkpoints(folder)
        if not found:
            continue
        records = json.loads(checkpoint.read(found[-1])["records"])
        worker, seed, setting = folder.parts[-5], folder.parts[-4], folder.parts[-3]
        rounds = [
            {
                "round": r["round"],
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
                "round_error": r.get("round_error"),
                "heldout_loss": r.get("eval", {}).get("heldout_loss"),
            }
            for r in records
        ]
        out.append({"worker": worker, "seed": seed, "setting": setting, "variant": folder.name,
                    "rounds_done": len(records), "rounds": rounds})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", default="runs/fair-cache")
    p.add_argument("--out", default="docs/results/fair/progress.json")
    args = p.parse_args()
    rows = progress(Path(args.cache))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        last = r["rounds"][-1]
        up = sum(x["bytes_up"] for x in r["rounds"]) / 1e6
        print(f"{r['setting']:13s} {r['seed']} {r['variant']:32s} rounds {r['rounds_done']:2d}  "
              f"loss {last['heldout_loss']:.4f}  up {up:6.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
