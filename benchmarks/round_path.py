"""The layout's measured facts for docs/architecture.md: which source files a client reply crosses
from the strategy's ``aggregate_train`` to the server's global model, package line counts, and the
import graph between packages.

    .venv/bin/python benchmarks/round_path.py [--method florist] [--json]

``--method``: any method whose uploads carry A (the fabricated replies do; FFA-LoRA's and FedSVD's
send B only).

The path is traced, not read: round 2's three fabricated replies (the real codec, reply checks,
round function, aggregator and global model on a tiny random Llama) go through
``FederatedLoRA.aggregate_train`` with a profiler recording every ``src/florist`` file entered, in
first-entry order. Line counts are ``wc -l`` of each package's ``.py`` files; the import graph is
``tests/unit/test_purity.py``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "florist"


def traced_path(method: str) -> list[str]:
    """Source files under ``src/florist`` entered during round 2's ``aggregate_train`` (a round with a
    history: deltas against what was sent), in first-entry order."""
    sys.path.insert(0, str(ROOT))
    from tests.peft_helpers import tiny_llama
    from tests.unit.test_strategy_reliability import clients, honest, reply

    from florist.config import load_config
    from florist.flower.strategy import FederatedLoRA
    from florist.server.global_model import GlobalModel, adapted_shapes

    cfg = load_config(None, ["federation.num_clients=3", "lora.ranks=[4]", f"aggregation.method={method!r}"])
    model = tiny_llama(0)
    shapes = adapted_shapes(model, ("q_proj", "v_proj"))
    agg = cfg.aggregator()
    s = FederatedLoRA(cfg, agg, clients(3), shapes, model=GlobalModel(model, None, agg.protocol))
    s.aggregate_train(1, [reply(honest(shapes, k)) for k in range(3)])  # round 1, not traced
    replies = [reply(honest(shapes, k, common=0.5), merged=(1,) if s.merges else ()) for k in range(3)]
    seen: dict[str, None] = {}

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(SRC):
                seen.setdefault(str(path.relative_to(SRC)), None)

    sys.setprofile(profile)
    try:
        s.aggregate_train(2, replies)
    finally:
        sys.setprofile(None)
    assert len(s.server.history) == 2, "round 2 did not aggregate"
    return list(seen)


def line_counts() -> dict[str, int]:
    """Lines of each package (``src/florist/<package>/**.py``) and of the top-level modules."""
    out: dict[str, int] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        key = rel.parts[0] if len(rel.parts) > 1 else "top level"
        out[key] = out.get(key, 0) + len(path.read_text().splitlines())
    return out


def import_graph() -> dict[str, list[str]]:
    sys.path.insert(0, str(ROOT))
    from tests.unit.test_purity import _package_graph

    return {k: sorted(v) for k, v in sorted(_package_graph().items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="florist")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from florist.console import quiet_imports

    quiet_imports()  # bitsandbytes' notice about an optional CPU kernel package
    path = traced_path(args.method)
    facts = {"method": args.method, "path": path, "files": len(path),
             "packages": sorted({f.split("/")[0] if "/" in f else "top level" for f in path}),
             "lines": line_counts(), "imports": import_graph()}  # fmt: skip
    if args.json:
        print(json.dumps(facts, indent=1))
        return
    print(f"{args.method}: a reply crosses {len(path)} files from aggregate_train to the global model:")
    for f in path:
        print(f"  {f}")
    print("\nlines per package:")
    for k, v in sorted(facts["lines"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<12} {v:>6}")
    print(f"  {'total':<12} {sum(facts['lines'].values()):>6}")
    print("\nimports between packages:")
    for k, v in facts["imports"].items():
        print(f"  {k:<11} -> {', '.join(v)}")


if __name__ == "__main__":
    main()
