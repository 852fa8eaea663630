"""Local training throughput: florist's loop against a bare peft + torch loop, side by side.

    .venv/bin/python benchmarks/client_throughput.py [--steps 6] [--seq 256] [--batch 4] [--no-round]

Both train the same LoRA (r=16, alpha=32, q_proj + v_proj) on SmolLM2-135M-Instruct with the same
fixed batches of ``--seq`` tokens, fp32, 2 threads. Runs alternate (bare, florist, bare, florist)
after one warm-up step each, so drift on a shared machine hits both alike. Prints tokens/s and the
ratio (goal: florist >= 0.95 x bare) and writes JSON.

Then one federated round, measured: a 2-client FLoRIST federation on Flower's simulation runtime
(same LoRA, ``--steps`` steps of batch ``--batch`` on the skills set per client), and the wall time of
its second round (models already loaded) split into client training, transport and orchestration
(Flower messages, Ray, encoding: the send-and-receive time less the training), aggregation, and
server-side evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from florist.client.lora_state import reinit
from florist.client.model import load_model
from florist.client.train import LoraSettings, TrainSettings, train
from florist.data.tokenize import Encoded
from florist.fsutil import write_json_atomic

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "client_throughput.json"
LORA = LoraSettings(rank=16, alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"))


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


def bare_loop(model: Any, data: list[Encoded], steps: int, batch: int, lr: float) -> float:
    """The reference: a hand-written AdamW loop over peft's trainable parameters. Returns seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        chunk = data[(step * batch) % len(data) :][:batch]
        ids = torch.tensor([e.input_ids for e in chunk])
        labels = torch.tensor([e.labels for e in chunk])
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def florist_loop(model: Any, data: list[Encoded], steps: int, batch: int, lr: float) -> float:
    settings = TrainSettings(
        lr=lr, steps=steps, batch_size=batch, max_length=len(data[0]), max_grad_norm=None
    )
    return train(model, data, settings, seed=0, pad_id=0, desc="florist").seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    base, tokenizer = load_model()
    data = fixed_batches(len(tokenizer), args.seq, args.batch * args.steps)
    tokens = args.seq * args.batch * args.steps
    runs: dict[str, list[float]] = {"bare": [], "florist": []}
    loops = {"bare": bare_loop, "florist": florist_loop}
    for loop in loops.values():  # warm-up
        loop(peft_model(base), data, 1, args.batch, 1e-4)
    for _ in range(args.repeats):
        for name, loop in loops.items():
            runs[name].append(tokens / loop(peft_model(base), data, args.steps, args.batch, 1e-4))
    tps = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "tokens_per_second": tps,
        "samples": runs,
        "ratio_florist_over_bare": tps["florist"] / tps["bare"],
    }


def measure_round(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Second-round wall time of a 2-client FLoRIST federation, by phase."""
    from florist.config import load_config
    from florist.tools.run import run_simulation

    cfg = load_config(
        None,
        [
            "federation.num_clients=2", "federation.rounds=2", "lora.ranks=[16]", "lora.alpha=32.0",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.max_length={args.seq}",
            "data.skills_train=20", "data.skills_test=4", "data.split='iid'",
            "eval.every=1", "eval.before=false",
            f"run.dir={str(run_dir)!r}", "run.name='round'", "run.progress=false",
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


def print_round(res: dict[str, Any]) -> None:
    total = res["round_seconds"]
    print(f"\nround {res['round']} of a 2-client FLoRIST federation: {total:.1f} s wall")
    print(f"{'phase':<38}{'seconds':>10}{'share':>8}")
    for name, sec in res["phases"].items():
        print(f"{name:<38}{sec:>10.2f}{sec / total:>8.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-round", action="store_true", help="skip the federated round")
    args = p.parse_args()
    result = measure(args)
    tps = result["tokens_per_second"]
    print(
        f"SmolLM2-135M LoRA r=16 q,v, fp32, seq {result['seq']}, batch {result['batch']}, "
        f"{result['steps']} steps x {len(result['samples']['bare'])} alternating runs"
    )
    print(f"{'loop':<10}{'tokens/s':>12}")
    for name, value in tps.items():
        print(f"{name:<10}{value:>12.1f}")
    ratio = result["ratio_florist_over_bare"]
    print(f"florist / bare = {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    if not args.no_round:
        with tempfile.TemporaryDirectory() as tmp:
            result["federated_round"] = measure_round(args, Path(tmp))
        print_round(result["federated_round"])
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
