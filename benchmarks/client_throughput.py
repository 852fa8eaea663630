"""Training and evaluation throughput in fp32 and bf16 autocast, side by side, and one federated round.

    .venv/bin/python benchmarks/client_throughput.py [--steps 6] [--seq 256] [--batch 4] [--no-round]

Training: the same LoRA (r=16, alpha=32, q_proj + v_proj) on SmolLM2-135M-Instruct, the same fixed
batches of ``--seq`` tokens (loss on the second half, as with response-only labels), 2 threads, by two
loops: a bare peft + torch loop (``model(labels=...)``, AdamW) and florist's ``train``; each in fp32
and under bf16 autocast (``train.precision``). The four runs alternate after one warm-up step each,
so drift on a shared machine hits all alike. Prints tokens/s, bf16/fp32 per loop and florist/bare.

Evaluation: held-out loss (``florist.eval.heldout_loss``, tokens/s) and greedy exact-match answers
(``florist.eval.exact_match``, answers/s) on the same rows in fp32 and under bf16 autocast
(``eval.precision``), alternating, with the loss difference between the two precisions.

Then one federated round per precision: a 2-client FLoRIST federation on Flower's simulation
runtime (same LoRA, ``--steps`` steps of batch ``--batch`` on the skills set per client), the wall
time of its second round (models already loaded) split into client training, transport and
orchestration, aggregation and server-side evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from florist.client.lora_state import reinit
from florist.client.model import load_model
from florist.client.train import LoraSettings, TrainSettings, train
from florist.data.loaders import load_examples
from florist.data.records import Example
from florist.data.skills import make_skills_dataset
from florist.data.tokenize import Encoded
from florist.eval import exact_match, heldout_loss
from florist.eval.paired import paired_difference
from florist.fsutil import write_json_atomic
from florist.precision import Precision, resolve

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "client_throughput.json"
DOLLY_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly-8clients" / "test.json"
LORA = LoraSettings(rank=16, alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"))
PRECISIONS = ("fp32", "bf16")
GOAL = 2.0  # bf16 / fp32 tokens per second, training and evaluation


def fixed_batches(vocab: int, seq: int, n: int) -> list[Encoded]:
    """``n`` sequences of exactly ``seq`` random tokens, loss on the second half."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        out.append(Encoded(input_ids=ids, labels=[-100] * (seq // 2) + ids[seq // 2 :]))
    return out


def peft_model(base: Any) -> Any:
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), LORA.peft_config())
    reinit(model, seed=0)
    return model


def precision(name: str) -> Precision:
    return Precision(name, "cpu", "benchmark")


def bare_loop(model: Any, data: list[Encoded], steps: int, batch: int, prec: str) -> float:
    """The reference: a hand-written AdamW loop over peft's trainable parameters. Returns seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        chunk = data[(step * batch) % len(data) :][:batch]
        ids = torch.tensor([e.input_ids for e in chunk])
        labels = torch.tensor([e.labels for e in chunk])
        with precision(prec).autocast():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def florist_loop(model: Any, data: list[Encoded], steps: int, batch: int, prec: str) -> float:
    settings = TrainSettings(
        lr=1e-4, steps=steps, batch_size=batch, max_length=len(data[0]), max_grad_norm=None, precision=prec
    )
    return train(model, data, settings, seed=0, pad_id=0, desc="florist").seconds


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every run once to warm up, then ``repeats`` times in turn; the values each returned."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return samples


def measure_training(args: argparse.Namespace, base: Any, tokenizer: Any) -> dict[str, Any]:
    data = fixed_batches(len(tokenizer), args.seq, args.batch * args.steps)
    tokens = args.seq * args.batch * args.steps
    loops = {"bare": bare_loop, "florist": florist_loop}

    def run(loop: Callable[..., float], prec: str, steps: int) -> Callable[[], float]:
        return lambda: tokens / loop(peft_model(base), data, steps, args.batch, prec)

    runs = {f"{n} {p}": run(loop, p, args.steps) for n, loop in loops.items() for p in PRECISIONS}
    samples = alternate(runs, args.repeats)
    tps = {name: statistics.median(v) for name, v in samples.items()}
    return {
        "tokens_per_second": tps,
        "samples": samples,
        "bf16_over_fp32": {n: tps[f"{n} bf16"] / tps[f"{n} fp32"] for n in loops},
        "florist_over_bare": {p: tps[f"florist {p}"] / tps[f"bare {p}"] for p in PRECISIONS},
    }


def eval_rows(n: int) -> tuple[str, list[Example]]:
    """The Dolly held-out rows when ../shared/data is present, else the embedded skills test set."""
    if DOLLY_TEST.exists():
        return "Dolly test.json", load_examples(str(DOLLY_TEST))[:n]
    return "skills test set (no ../shared/data)", make_skills_dataset(20, n // 7 + 1, seed=0)[1][:n]


def measure_eval(args: argparse.Namespace, base: Any, tokenizer: Any) -> dict[str, Any]:
    """Held-out loss tokens/s and exact-match answers/s per precision, on one trained-looking model."""
    source, rows = eval_rows(args.eval_rows)
    model = peft_model(base)
    losses: dict[str, Any] = {}

    def loss_run(prec: str) -> Callable[[], float]:
        def go() -> float:
            start = time.perf_counter()
            with precision(prec).autocast():
                losses[prec] = heldout_loss(model, tokenizer, rows, args.seq, 8, progress=False)
            return losses[prec].n_tokens / (time.perf_counter() - start)

        return go

    def em_run(prec: str) -> Callable[[], float]:
        def go() -> float:
            start = time.perf_counter()
            with precision(prec).autocast():
                exact_match(model, tokenizer, rows[: args.em_rows], 12, 16, progress=False)
            return args.em_rows / (time.perf_counter() - start)

        return go

    runs = {f"held-out loss {p}": loss_run(p) for p in PRECISIONS}
    runs |= {f"exact match {p}": em_run(p) for p in PRECISIONS}
    samples = alternate(runs, args.repeats)
    rate = {name: statistics.median(v) for name, v in samples.items()}
    fp, bf = losses["fp32"], losses["bf16"]
    diffs = torch.tensor(bf.per_example) - torch.tensor(fp.per_example)  # (N,) paired, per row
    diffs = diffs[~diffs.isnan()]
    return {
        "source": source,
        "rows": len(rows),
        "rate": rate,
        "samples": samples,
        "bf16_over_fp32": {
            "held-out loss": rate["held-out loss bf16"] / rate["held-out loss fp32"],
            "exact match": rate["exact match bf16"] / rate["exact match fp32"],
        },
        "heldout_loss": {
            "fp32": fp.loss,
            "bf16": bf.loss,
            "max_row_abs_diff": float(diffs.abs().max()),
            "paired": paired_difference(fp, bf).to_dict(),
        },
    }


def measure_round(args: argparse.Namespace, run_dir: Path, prec: str) -> dict[str, Any]:
    """Second-round wall time of a 2-client FLoRIST federation, by phase."""
    from florist.config import load_config
    from florist.flower.simulation import run_simulation

    cfg = load_config(
        None,
        [
            "federation.num_clients=2", "federation.rounds=2", "lora.ranks=[16]", "lora.alpha=32.0",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.max_length={args.seq}",
            "data.skills_train=20", "data.skills_test=4", "data.split='iid'",
            "eval.every=1", "eval.before=false", f"train.precision='{prec}'", f"eval.precision='{prec}'",
            f"run.dir={str(run_dir)!r}", f"run.name='round-{prec}'", "run.progress=false",
        ],
    )  # fmt: skip
    summary = run_simulation(cfg)
    lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    r = json.loads(lines[-1])
    train_s = r["train_seconds_sum"]
    phases = {
        "client training (sum over clients)": train_s,
        "transport + orchestration": r["train_and_transport_seconds"] - train_s,
        "aggregation": r["aggregation_seconds"],
        "server evaluation": r["eval"]["eval_seconds"],
    }
    phases["other (run dir writes)"] = r["round_seconds"] - sum(phases.values())
    return {"round": r["round"], "round_seconds": r["round_seconds"], "phases": phases, "bytes": {
        "uplink": r["bytes_up"], "downlink": r["bytes_down"]}}  # fmt: skip


def verdict(ratio: float) -> str:
    return f"{ratio:.2f}x ({'goal met' if ratio >= GOAL else f'below the {GOAL:.0f}x goal'})"


def print_training(res: dict[str, Any], args: argparse.Namespace) -> None:
    tps = res["tokens_per_second"]
    print(
        f"\ntraining: SmolLM2-135M LoRA r=16 q,v, seq {args.seq}, batch {args.batch}, {args.steps} steps x "
        f"{args.repeats} alternating runs (median tokens/s)"
    )
    print(f"{'loop':<10}{'fp32':>10}{'bf16':>10}   bf16 / fp32")
    for n in ("bare", "florist"):
        print(
            f"{n:<10}{tps[n + ' fp32']:>10.1f}{tps[n + ' bf16']:>10.1f}   {verdict(res['bf16_over_fp32'][n])}"
        )
    fob = res["florist_over_bare"]
    print(f"florist / bare: fp32 {fob['fp32']:.3f}, bf16 {fob['bf16']:.3f}")


def print_eval(res: dict[str, Any]) -> None:
    rate, loss = res["rate"], res["heldout_loss"]
    print(f"\nevaluation on {res['rows']} rows of the {res['source']} (median of alternating runs)")
    print(f"{'':<32}{'fp32':>10}{'bf16':>10}   bf16 / fp32")
    for name, unit in (("held-out loss", "scored tokens/s"), ("exact match", "answers/s")):
        label = f"{name} ({unit})"
        fp, bf = rate[f"{name} fp32"], rate[f"{name} bf16"]
        print(f"{label:<32}{fp:>10.1f}{bf:>10.1f}   {verdict(res['bf16_over_fp32'][name])}")
    p = loss["paired"]
    print(
        f"held-out loss: fp32 {loss['fp32']:.5f}, bf16 {loss['bf16']:.5f}; bf16 - fp32 paired "
        f"{p['mean']:+.5f} [{p['low']:+.5f}, {p['high']:+.5f}] "
        f"(largest per-row {loss['max_row_abs_diff']:.4f})"
    )


def print_round(rounds: dict[str, dict[str, Any]]) -> None:
    fp, bf = rounds["fp32"], rounds["bf16"]
    print(f"\nround {fp['round']} of a 2-client FLoRIST federation, wall seconds")
    print(f"{'phase':<38}{'fp32':>9}{'bf16':>9}{'bf16 share':>12}")
    for name in fp["phases"]:
        a, b = fp["phases"][name], bf["phases"][name]
        print(f"{name:<38}{a:>9.2f}{b:>9.2f}{b / bf['round_seconds']:>12.1%}")
    print(f"{'round':<38}{fp['round_seconds']:>9.2f}{bf['round_seconds']:>9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eval-rows", type=int, default=40, help="held-out rows scored per run")
    p.add_argument("--em-rows", type=int, default=16, help="rows answered greedily per run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-round", action="store_true", help="skip the federated rounds")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"this machine: {resolve('auto', 'cpu').describe()}")
    base, tokenizer = load_model()
    result: dict[str, Any] = {"seq": args.seq, "batch": args.batch, "steps": args.steps}
    result["training"] = measure_training(args, base, tokenizer)
    print_training(result["training"], args)
    result["evaluation"] = measure_eval(args, base, tokenizer)
    print_eval(result["evaluation"])
    if not args.no_round:
        with tempfile.TemporaryDirectory() as tmp:
            result["federated_round"] = {prec: measure_round(args, Path(tmp), prec) for prec in PRECISIONS}
        print_round(result["federated_round"])
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
