"""Useful (real, non-padding) tokens per second of client training and held-out scoring, side by side.

    .venv/bin/python benchmarks/client_throughput.py [--steps 6] [--batch 4] [--repeats 2] [--no-round]

Training draws real Dolly batches as a client does (``BatchStream`` over ``client_0.json`` of
``../shared/data/dolly-8clients``, batch ``--batch``, max length 256, response-only labels; the
embedded skills set when the shared data is absent) and trains the same LoRA (r=16, alpha=32,
dropout 0.05, q_proj + v_proj) on SmolLM2-135M-Instruct, 2 threads, in four configurations:

    fp32 padded                 today's baseline: right-padded batches in float32
    bf16 padded                 bf16 autocast (``train.precision``)
    bf16 packed                 + the batch's rows side by side, nothing padded (``train.batching``)
    bf16 packed compiled        + the decoder layers under torch.compile (``train.compile``)

each by two loops: florist's ``train`` and a bare peft + torch loop (``model(labels=...)``, AdamW;
packed through transformers' own packed-sequence mask, compiled the same way). Every run starts
from the same stream position, so all see the same batches; runs alternate after one warm-up each
(the warm-up of a compiled run pays the compilation, reported on its own). Tokens/s counts real
tokens only, so padding is work that earns nothing; ratios are against florist's fp32 padded loop.

Held-out scoring: ``florist.eval.heldout_loss`` on the Dolly test rows in the same four
configurations (the compiled one in inference mode), and greedy exact-match answers in fp32 and
bf16, alternating, with the loss difference of each configuration against fp32 padded.

Then one federated round per setting: a 2-client FLoRIST federation on Flower's simulation runtime
(``--steps`` steps of batch ``--batch`` on the skills set per client), fp32 padded against the
default (bf16 packed), the wall time of its second round (models already loaded) split into client
training, transport and orchestration, aggregation and server-side evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from florist.client.compiled import compiled_layers
from florist.client.lora_state import reinit
from florist.client.model import load_model
from florist.client.packed_attention import packed_attention
from florist.client.train import BatchStream, TrainSettings, encode_all, train
from florist.config.schema import AdapterConfig
from florist.data.loaders import load_examples
from florist.data.records import Example
from florist.data.skills import make_skills_dataset
from florist.data.tokenize import Encoded, make_batch, real_tokens
from florist.eval import exact_match, heldout_loss
from florist.eval.paired import paired_difference
from florist.fsutil import write_json_atomic
from florist.precision import Precision, resolve

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "client_throughput.json"
DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly-8clients"
LORA = AdapterConfig(ranks=(16,), alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"))
MAX_LENGTH = 256
GOAL = 2.5  # useful tokens/s of the fastest exact configuration over fp32 padded, training


@dataclass(frozen=True)
class Setting:
    """One configuration: ``precision`` (fp32 / bf16), ``batching`` (padded / packed), ``compile``."""

    precision: str
    batching: str
    compile: bool = False

    @property
    def name(self) -> str:
        return f"{self.precision} {self.batching}" + (" compiled" if self.compile else "")


SETTINGS = (
    Setting("fp32", "padded"),
    Setting("bf16", "padded"),
    Setting("bf16", "packed"),
    Setting("bf16", "packed", compile=True),
)
BASELINE = SETTINGS[0].name


def train_rows() -> tuple[str, list[Example]]:
    """A Dolly client's rows when ../shared/data is present, else the embedded skills training set."""
    if (DOLLY / "client_0.json").exists():
        return "Dolly client_0.json", load_examples(str(DOLLY / "client_0.json"))
    return "skills training set (no ../shared/data)", make_skills_dataset(60, 2, seed=0)[0]


def peft_model(base: Any) -> Any:
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), LORA.peft_config())
    reinit(model, seed=0)
    return model


def precision(name: str) -> Precision:
    return Precision(name, "cpu", "benchmark")


def bare_loop(model: Any, data: list[Encoded], steps: int, batch: int, s: Setting) -> tuple[int, float]:
    """The reference: a hand-written AdamW loop over peft's trainable parameters, transformers' loss.
    Returns (real tokens, seconds)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    stream, tokens = BatchStream(data, batch, seed=0), 0
    model.train()
    start = time.perf_counter()
    with compiled_layers(model, s.compile):
        for _ in range(steps):
            b = make_batch(stream.next(), 0, s.batching)
            tokens += real_tokens(b)
            inputs = {"attention_mask": b["attention_mask"]} if s.batching == "padded" else {
                "position_ids": b["position_ids"], "use_cache": False}  # fmt: skip
            with precision(s.precision).autocast():
                loss = model(input_ids=b["input_ids"], labels=b["labels"], **inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tokens, time.perf_counter() - start


def florist_loop(model: Any, data: list[Encoded], steps: int, batch: int, s: Setting) -> tuple[int, float]:
    settings = TrainSettings(
        lr=1e-4, steps=steps, batch_size=batch, max_length=MAX_LENGTH, precision=s.precision,
        batching=s.batching, compile=s.compile,
    )  # fmt: skip
    stats = train(model, data, settings, seed=0, pad_id=0, desc="florist")
    return stats.tokens, stats.seconds


def alternate(
    runs: dict[str, Callable[[], float]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Call every run once to warm up, then ``repeats`` times in turn. Returns the values each
    returned and the warm-up's wall seconds (which hold any compilation)."""
    warmup = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        warmup[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return samples, warmup


def measure_training(args: argparse.Namespace, base: Any, tokenizer: Any) -> dict[str, Any]:
    source, rows = train_rows()
    data = encode_all(rows, tokenizer, TrainSettings(max_length=MAX_LENGTH))
    loops = {"bare": bare_loop, "florist": florist_loop}
    drawn = [make_batch(b, 0, "padded") for b in _batches(data, args.batch, args.steps)]
    real = sum(real_tokens(b) for b in drawn)
    padded = sum(int(b["input_ids"].numel()) for b in drawn)

    def run(loop: Callable[..., tuple[int, float]], s: Setting) -> Callable[[], float]:
        def go() -> float:
            tokens, seconds = loop(peft_model(base), data, args.steps, args.batch, s)
            return tokens / seconds

        return go

    runs = {f"{n} {s.name}": run(loop, s) for s in SETTINGS for n, loop in loops.items()}
    samples, warmup = alternate(runs, args.repeats)
    tps = {name: statistics.median(v) for name, v in samples.items()}
    base_tps = tps[f"florist {BASELINE}"]
    return {
        "source": source,
        "real_token_share": real / padded,
        "tokens_per_step": real / args.steps,
        "useful_tokens_per_second": tps,
        "samples": samples,
        "warmup_seconds": warmup,
        "over_florist_fp32_padded": {name: v / base_tps for name, v in tps.items()},
        "florist_over_bare": {s.name: tps[f"florist {s.name}"] / tps[f"bare {s.name}"] for s in SETTINGS},
    }


def _batches(data: list[Encoded], batch: int, steps: int) -> list[list[Encoded]]:
    stream = BatchStream(data, batch, seed=0)
    return [stream.next() for _ in range(steps)]


def eval_rows(n: int) -> tuple[str, list[Example]]:
    """The Dolly held-out rows when ../shared/data is present, else the embedded skills test set."""
    if (DOLLY / "test.json").exists():
        return "Dolly test.json", load_examples(str(DOLLY / "test.json"))[:n]
    return "skills test set (no ../shared/data)", make_skills_dataset(20, n // 7 + 1, seed=0)[1][:n]


def measure_eval(args: argparse.Namespace, base: Any, tokenizer: Any) -> dict[str, Any]:
    """Held-out loss useful tokens/s per setting and exact-match answers/s per precision, one model."""
    source, rows = eval_rows(args.eval_rows)
    model = peft_model(base)
    losses: dict[str, Any] = {}

    def loss_run(s: Setting) -> Callable[[], float]:
        def go() -> float:
            prec = precision(s.precision)
            start = time.perf_counter()
            with (
                prec.autocast(),
                prec.frozen_weights_cast(model, everything=True),
                compiled_layers(model, s.compile),
                packed_attention(model),
            ):
                losses[s.name] = heldout_loss(
                    model, tokenizer, rows, MAX_LENGTH, 8, progress=False, batching=s.batching
                )
            return _tokens(rows, tokenizer) / (time.perf_counter() - start)

        return go

    def em_run(prec: str) -> Callable[[], float]:
        def go() -> float:
            start = time.perf_counter()
            with precision(prec).autocast():
                exact_match(model, tokenizer, rows[: args.em_rows], 12, 16, progress=False)
            return args.em_rows / (time.perf_counter() - start)

        return go

    runs = {f"held-out loss {s.name}": loss_run(s) for s in SETTINGS}
    runs |= {f"exact match {p}": em_run(p) for p in ("fp32", "bf16")}
    samples, warmup = alternate(runs, args.repeats)
    rate = {name: statistics.median(v) for name, v in samples.items()}
    ref = losses[BASELINE]
    base_rate = rate[f"held-out loss {BASELINE}"]
    return {
        "source": source,
        "rows": len(rows),
        "rate": rate,
        "samples": samples,
        "warmup_seconds": warmup,
        "over_fp32_padded": {s.name: rate[f"held-out loss {s.name}"] / base_rate for s in SETTINGS},
        "exact_match_bf16_over_fp32": rate["exact match bf16"] / rate["exact match fp32"],
        "heldout_loss": {s.name: losses[s.name].loss for s in SETTINGS},
        "paired_vs_fp32_padded": {
            s.name: paired_difference(ref, losses[s.name]).to_dict() for s in SETTINGS[1:]
        },
    }


def _tokens(rows: list[Example], tokenizer: Any) -> int:
    """Real tokens of ``rows`` as scored (prompt and response, truncated as in training)."""
    from florist.data.tokenize import encode

    return sum(len(encode(r, tokenizer, MAX_LENGTH)) for r in rows)


def measure_round(args: argparse.Namespace, run_dir: Path, s: Setting) -> dict[str, Any]:
    """Second-round wall time of a 2-client FLoRIST federation, by phase."""
    from florist.config import load_config
    from florist.flower.simulation import run_simulation

    cfg = load_config(
        None,
        [
            "federation.num_clients=2", "federation.rounds=2", "lora.ranks=[16]", "lora.alpha=32.0",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.max_length={MAX_LENGTH}",
            "data.skills_train=20", "data.skills_test=4", "data.split='iid'", "eval.every=1",
            "eval.before=false", f"train.precision='{s.precision}'", f"eval.precision='{s.precision}'",
            f"train.batching='{s.batching}'", f"eval.batching='{s.batching}'",
            f"train.compile={str(s.compile).lower()}",
            f"run.dir={str(run_dir)!r}", f"run.name='round-{s.name.replace(' ', '-')}'", "run.progress=false",
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
    return f"{ratio:.2f}x ({'meets' if ratio >= GOAL else 'below'} the {GOAL}x goal)"


def print_training(res: dict[str, Any], args: argparse.Namespace) -> None:
    tps, ratio, warm = res["useful_tokens_per_second"], res["over_florist_fp32_padded"], res["warmup_seconds"]
    print(
        f"\ntraining: SmolLM2-135M LoRA r=16 q,v, {res['source']} batches of {args.batch} (max length "
        f"{MAX_LENGTH}, {res['real_token_share']:.1%} of padded positions are real tokens, "
        f"{res['tokens_per_step']:.0f} real tokens per step), {args.steps} steps x {args.repeats} "
        "alternating runs, median useful (real) tokens/s"
    )
    print(f"{'setting':<24}{'bare':>9}{'florist':>9}{'florist / bare':>16}   florist / florist fp32 padded")
    for s in SETTINGS:
        b, f = tps[f"bare {s.name}"], tps[f"florist {s.name}"]
        print(f"{s.name:<24}{b:>9.1f}{f:>9.1f}{f / b:>16.3f}   {verdict(ratio[f'florist {s.name}'])}")
    compiled = [s for s in SETTINGS if s.compile]
    for s in compiled:
        print(
            f"warm-up run of '{s.name}' (compiles): florist {warm[f'florist {s.name}']:.1f} s, "
            f"bare {warm[f'bare {s.name}']:.1f} s; the same run eager: {warm[f'florist {s.name[:-9]}']:.1f} s"
        )


def print_eval(res: dict[str, Any]) -> None:
    rate = res["rate"]
    print(f"\nheld-out scoring of {res['rows']} rows of the {res['source']} (median of alternating runs)")
    print(f"{'setting':<24}{'tokens/s':>10}{'/ fp32 padded':>15}{'loss':>10}   paired vs fp32 padded")
    for s in SETTINGS:
        pd = res["paired_vs_fp32_padded"].get(s.name)
        paired = f"{pd['mean']:+.5f} [{pd['low']:+.5f}, {pd['high']:+.5f}]" if pd else ""
        print(
            f"{s.name:<24}{rate[f'held-out loss {s.name}']:>10.1f}{res['over_fp32_padded'][s.name]:>14.2f}x"
            f"{res['heldout_loss'][s.name]:>10.5f}   {paired}"
        )
    print(
        f"exact match (answers/s): fp32 {rate['exact match fp32']:.2f}, bf16 {rate['exact match bf16']:.2f} "
        f"({res['exact_match_bf16_over_fp32']:.2f}x)"
    )


def print_round(rounds: dict[str, dict[str, Any]]) -> None:
    (na, a), (nb, b) = rounds.items()
    print(f"\nround {a['round']} of a 2-client FLoRIST federation, wall seconds")
    print(f"{'phase':<38}{na:>14}{nb:>14}{'share':>8}")
    for name in a["phases"]:
        x, y = a["phases"][name], b["phases"][name]
        print(f"{name:<38}{x:>14.2f}{y:>14.2f}{y / b['round_seconds']:>8.1%}")
    print(f"{'round':<38}{a['round_seconds']:>14.2f}{b['round_seconds']:>14.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
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
    result: dict[str, Any] = {"batch": args.batch, "steps": args.steps, "max_length": MAX_LENGTH}
    result["training"] = measure_training(args, base, tokenizer)
    print_training(result["training"], args)
    result["evaluation"] = measure_eval(args, base, tokenizer)
    print_eval(result["evaluation"])
    if not args.no_round:
        default = Setting("bf16", "packed")
        with tempfile.TemporaryDirectory() as tmp:
            result["federated_round"] = {
                s.name: measure_round(args, Path(tmp), s) for s in (SETTINGS[0], default)
            }
        print_round(result["federated_round"])
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
