"""FLoRIST on a 4-bit (NF4) client base against the same federation on the full-precision base.

    nice .venv/bin/python benchmarks/quantized_merge.py [--rounds 3] [--steps 8] [--seeds 0,1] [--cap 8]
        [--work runs/quantized-merge] [--out benchmarks/results/quantized_merge.json]

The regime is the packaged paper_cpu.toml (SmolLM2, the paper's 8 Dolly clients, rank 16 on q/v,
lr 1e-3, batch 4, max length 256, the shared init) with FLoRIST at tau = 0.9, ``--steps`` local steps
per round and ``--rounds`` rounds. Three variants per seed, with the same data, seeds and budget:

    fp32 base         clients merge every global update into their base weights (W0 += B_g A_g)
    nf4 base, exact   clients on an NF4 base hold the merged updates beside it as G, uncapped
    nf4 base, cap r   the same, G re-compressed to rank <= ``--cap`` per module after every round

After the last round the server's model (the full-precision base + the run's update, which is what
``florist export --merge`` serves) is scored on the 80 held-out test rows, per row, in fp32; the
table gives each nf4 variant's paired difference in held-out loss against the fp32 base (nats, 95 %
interval over rows, and over seeds when there are several) and G's rank and the energy the cap kept.
Each variant checkpoints every round under ``--work`` (``florist.studies.simulate.run_variant``), so
the same command continues a killed run; finished variants are read back, not rerun.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from florist.cli_parsing import ints

VARIANTS = {  # name -> overrides (the cap's rank is filled in from --cap)
    "fp32 base": (),
    "nf4 base, exact G": ("model.quantization='nf4'",),
    "nf4 base, capped G": ("model.quantization='nf4'", "model.global_adapter_max_rank={cap}"),
}


def config(name: str, seed: int, args: argparse.Namespace) -> Any:
    from florist.config import PAPER_CONFIG, load_config

    keys = [k.format(cap=args.cap) for k in VARIANTS[name]]
    return load_config(PAPER_CONFIG, [
        "aggregation.method='florist'", "aggregation.tau=0.9", f"federation.rounds={args.rounds}",
        f"train.steps={args.steps}", "train.examples=none", f"federation.seed={seed}", "run.progress=false",
        *keys,
    ])  # fmt: skip


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One variant and seed: its records (resumed per round) and the final per-row held-out losses."""
    from florist.studies.headline import slug, split_evaluator
    from florist.studies.simulate import run_variant

    folder = args.work / f"seed-{seed}" / slug(name)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())  # type: ignore[no-any-return]
    cfg = config(name, seed, args)
    ckpt = folder / "checkpoint"
    records = run_variant(cfg, split_evaluator(cfg), eval_rounds=[args.rounds], checkpoint=ckpt)
    out = {"variant": name, "seed": seed, "records": records}
    g = cfg.held_updates()
    if g is not None:  # G: fold the run's global updates as its clients and server did
        from florist.server import checkpoint

        state = checkpoint.load_latest(ckpt, cfg, force=False)
        for _, result in state.history:
            g.fold(result.global_update)
        ranks = g.ranks()
        out["held_rank"] = {"min": min(ranks.values()), "max": max(ranks.values()),
                            "mean": sum(ranks.values()) / len(ranks)}  # fmt: skip
        if g.energy_kept:
            out["held_energy_kept_min"] = min(g.energy_kept.values())
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(out) + "\n")
    return out


def as_trained(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Why an nf4 variant scores as it does: the held-out rows scored on the 4-bit base itself, with
    and without the G its clients held (the model they trained), and the full-precision base alone."""
    from peft import get_peft_model

    from florist.client.merged import BesideBase
    from florist.client.model import load_client_model, load_model
    from florist.server import checkpoint
    from florist.studies.headline import slug, split_evaluator

    folder = args.work / f"seed-{seed}" / slug(name)
    done = folder / "as_trained.json"
    if done.is_file():
        return json.loads(done.read_text())  # type: ignore[no-any-return]
    cfg = config(name, seed, args)
    evaluate = split_evaluator(cfg)
    g = cfg.held_updates()
    assert g is not None
    state = checkpoint.load_latest(folder / "checkpoint", cfg, force=False)
    for _, result in state.history:
        g.fold(result.global_update)
    out: dict[str, Any] = {}
    model, tok = load_client_model(cfg)
    peft = get_peft_model(model, cfg.lora.peft_config())  # B = 0: the LoRA adds nothing
    base = BesideBase(peft, type(g)(g.max_rank, g.tau))  # nothing held: the 4-bit base alone
    out["nf4 base"] = evaluate(peft, tok)
    base.restore(g)
    out["nf4 base + G"] = evaluate(peft, tok)
    full, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
    out["fp32 base"] = evaluate(full, tok)
    done.write_text(json.dumps(out) + "\n")
    return out


def loss_result(ev: dict[str, Any]) -> Any:
    """An evaluation's per-row held-out losses as a ``LossResult`` (for paired differences)."""
    from florist.eval.heldout import LossResult

    rows = [float("nan") if x is None else x for x in ev["heldout_rows"]]
    tokens = ev["heldout_tokens"]
    return LossResult(ev["heldout_loss"], 0.0, sum(tokens), rows, tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seeds", type=ints, default=(0,))
    p.add_argument("--cap", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("runs/quantized-merge"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_merge.json"))
    p.add_argument(
        "--as-trained", action="store_true", help="also score nf4 G on the 4-bit base, and both bases"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from florist.console import quiet_imports
    from florist.eval.paired import paired_over_seeds

    quiet_imports()
    runs = {(name, s): run_one(name, s, args) for s in args.seeds for name in VARIANTS}
    table = {}
    base = "fp32 base"
    for name in VARIANTS:
        finals = [runs[(name, s)]["records"][-1] for s in args.seeds]
        row: dict[str, Any] = {
            "heldout_loss": [f["eval"]["heldout_loss"] for f in finals],
            "bytes_up": [sum(r["bytes_up"] for r in runs[(name, s)]["records"]) for s in args.seeds],
        }
        for key in ("held_rank", "held_energy_kept_min"):
            if key in runs[(name, args.seeds[0])]:
                row[key] = [runs[(name, s)][key] for s in args.seeds]
        if name != base:
            final = {
                who: [loss_result(runs[(who, s)]["records"][-1]["eval"]) for s in args.seeds]
                for who in (base, name)
            }
            pairs = list(zip(final[base], final[name], strict=True))
            row["minus_fp32"] = paired_over_seeds(pairs).to_dict()
            row["minus_fp32_text"] = paired_over_seeds(pairs).describe()
            if args.as_trained:  # why: the same G on the 4-bit base its clients trained on
                why = [as_trained(name, s, args) for s in args.seeds]
                diffs = {
                    "nf4 base - fp32 base (before training)": ("fp32 base", "nf4 base"),
                    "nf4 base + G - fp32 base + its updates": (None, "nf4 base + G"),
                    "fp32 base + G - nf4 base + G (the same G)": ("nf4 base + G", None),
                }
                row["why"] = {}
                for label, (a, b) in diffs.items():
                    pick = []
                    for i, w in enumerate(why):  # None: the run's own final scoring (full-precision base)
                        first = loss_result(w[a]) if a else final[base][i]
                        pick.append((first, loss_result(w[b]) if b else final[name][i]))
                    row["why"][label] = paired_over_seeds(pick).describe()
                row["nf4_base_plus_g_loss"] = [w["nf4 base + G"]["heldout_loss"] for w in why]
        table[name] = row
        print(f"{name:22s} held-out loss {row['heldout_loss']}  {row.get('minus_fp32_text', '(reference)')}"
              + (f"  G rank {row['held_rank']}" if "held_rank" in row else "")
              + (f"  energy kept >= {row['held_energy_kept_min']}" if "held_energy_kept_min" in row else ""),
              flush=True)  # fmt: skip
        for label, text in row.get("why", {}).items():
            print(f"    {label}: {text}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    regime = {"rounds": args.rounds, "steps": args.steps, "seeds": list(args.seeds), "cap": args.cap,
              "method": "florist tau 0.9", "config": "paper_cpu.toml"}  # fmt: skip
    args.out.write_text(json.dumps({"regime": regime, "variants": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
