"""Peak memory and speed of one client's round on SmolLM2, per base precision and checkpointing.

    .venv/bin/python benchmarks/client_memory.py [--steps 4] [--out benchmarks/results/client_memory.json]

Each configuration runs in a fresh process (so its peak resident memory is its own): load the base
(fp32, bf16 autocast on fp32 weights, or NF4 / int8 through bitsandbytes), build one client of the
paper_cpu regime (rank 16 on q/v, batch 4, max length 256, Dolly client 0) and train ``--steps``
steps. Printed per configuration: resident memory before the round (the loaded model), its peak
during the round (sampled every 20 ms), the process's peak (``resource.getrusage``: loading a
quantized model passes through its full-precision weights), the time per step and the useful
tokens per second, and on a GPU the peak CUDA memory allocated. Beside it, the analytic weights +
LoRA + optimizer figure for a 7B and a 70B base (activations excluded: they depend on the sequence
length and checkpointing).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

CONFIGS = {  # name -> overrides
    "fp32": ("train.precision='fp32'",),
    "bf16 autocast": ("train.precision='bf16'",),
    "nf4 base": ("train.precision='fp32'", "model.quantization='nf4'"),
    "int8 base": ("train.precision='fp32'", "model.quantization='int8'"),
}


def one(overrides: list[str], steps: int) -> dict[str, float]:
    from florist.client.local import client_from_config
    from florist.client.model import load_client_model
    from florist.config import PAPER_CONFIG, load_config
    from florist.data.federated import client_examples

    keys = [f"train.steps={steps}", "aggregation.method='fedit'", "aggregation.tau=none",
            "lora.warm_start=false", "run.progress=false"]  # fmt: skip
    cfg = load_config(PAPER_CONFIG, [*overrides, *keys])
    model, tok = load_client_model(cfg)
    client = client_from_config(
        cfg, 0, model, tok, client_examples(cfg.data, 0, 8), cfg.aggregator().protocol
    )
    proc, samples, done = psutil.Process(), [], threading.Event()

    def sample() -> None:  # the round's own peak: RSS every 20 ms while it trains
        while not done.is_set():
            samples.append(proc.memory_info().rss)
            time.sleep(0.02)

    before = proc.memory_info().rss
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, stats = client.fit(1)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return {
        "rss_before_round_mb": before / 2**20,
        "peak_rss_in_round_mb": max(samples, default=before) / 2**20,
        "peak_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": seconds / steps,
        "tokens_per_s": stats.tokens / seconds,
    } | ({"peak_cuda_allocated_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {})


def analytic(params_b: float, lora_params_m: float) -> dict[str, float]:
    """GB for the frozen weights in fp32 / bf16 / int8 (1 byte + a scale per row) / nf4 (0.5 byte + ~0.03
    of block scales) plus the
    LoRA, its gradients and AdamW's two moments in fp32 (16 bytes per LoRA parameter)."""
    lora = lora_params_m * 1e6 * 16 / 1e9
    return {
        f"{name}": params_b * 1e9 * size / 1e9 + lora
        for name, size in (("fp32", 4), ("bf16", 2), ("int8", 1.0), ("nf4", 0.53))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/client_memory.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one configuration
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(json.loads(args.one), args.steps)))
        return
    rows = {}
    for name, keys in CONFIGS.items():
        for ckpt in (False, True):
            overrides = [*keys, f"train.gradient_checkpointing={'true' if ckpt else 'false'}"]
            label = f"{name}, checkpointing {'on' if ckpt else 'off'}"
            child = [sys.executable, __file__, "--steps", str(args.steps), "--one", json.dumps(overrides)]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
            r = rows[label]
            print(f"{label:34s} RSS before {r['rss_before_round_mb']:6.0f} MB, in round "
                  f"{r['peak_rss_in_round_mb']:6.0f} MB, process {r['peak_rss_process_mb']:6.0f} MB, "
                  f"{r['seconds_per_step']:5.2f} s/step, {r['tokens_per_s']:4.0f} tok/s"
                  + (f", CUDA {r['peak_cuda_allocated_mb']:.0f} MB" if "peak_cuda_allocated_mb" in r else ""),
                  flush=True)  # fmt: skip
    # LoRA rank 16 on q/v: 7B (32 layers, 4096 x 4096 both) and 70B (80 layers, q 8192^2, v 1024 x 8192)
    big = {"7B": analytic(6.7, 32 * 2 * 16 * (4096 + 4096) / 1e6),
           "70B": analytic(69.0, 80 * 16 * ((8192 + 8192) + (8192 + 1024)) / 1e6)}  # fmt: skip
    for size, gb in big.items():
        print(
            f"{size} base, weights + LoRA + optimizer: " + ", ".join(f"{k} {v:.1f} GB" for k, v in gb.items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"steps": args.steps, "smollm2": rows, "analytic_gb": big}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
