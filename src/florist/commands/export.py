"""``florist export RUN_OR_ADAPTER -o OUT``: the result of a run, in a form a serving stack takes.

    florist export runs/florist-20261130-101500 --merge -o merged/          # base + adapter, one model
    florist export runs/florist-20261130-101500 --max-rank 16 -o capped/    # a PEFT adapter of rank <= 16
    florist export runs/.../adapter --tau 0.99 --max-rank 64 -o capped/     # and at most 99 % energy kept

``--merge`` writes a standard transformers model directory (safetensors, config, tokenizer) with
``W0 + scaling * B @ A`` in every adapted weight (peft's own merge). ``--max-rank``/``--tau``
re-compress the cumulative adapter per module with the factored SVD (no m x n matrix is formed):
the best rank-``p`` approximation of ``scaling * B @ A`` (Eckart-Young), ``p = min(max_rank, the
smallest rank holding tau of the energy)``, written as a PEFT adapter with ``export_report.json``
(rank and energy kept per module). LoRA servers cap adapter ranks (vLLM's ``max_lora_rank``); a
FLoRIST run's cumulative adapter sums every round's rank, so this is how it gets under the cap.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from florist.aggregation.held import compress
from florist.cli_parsing import finite
from florist.commands.aggregate import check_output
from florist.errors import ConfigError
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora.peft_io import (
    adapter_dir,
    florist_base,
    read_adapter,
    save_adapter_files,
    trained_quantization,
)
from florist.lora.validation import validate_updates

log = logging.getLogger(__name__)
REPORT = "export_report.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="RUN_OR_ADAPTER", help="a run directory (its adapter/) or a PEFT adapter dir"
    )
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--merge", action="store_true", help="save base + adapter as one transformers model")
    p.add_argument(
        "--base",
        help="--merge: the base model (default: the one a florist run trained on, "
        "else the adapter's base_model_name_or_path)",
    )
    p.add_argument("--max-rank", type=int, help="re-compress every module to at most this rank")
    p.add_argument("--tau", type=finite, help="re-compress to the smallest rank holding this energy fraction")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(args: argparse.Namespace) -> None:
    if args.merge and (args.max_rank is not None or args.tau is not None):
        raise ConfigError(
            "--merge writes the adapter as it is; re-compress with --max-rank/--tau in a separate export"
        )
    if args.merge:
        summary = export_merged(args.source, args.out, args.base, args.overwrite)
        print(f"merged {summary['modules']} modules into {summary['base_model']}: {args.out}")
        if summary["trained_on"]:
            print(f"trained on a {summary['trained_on']} base; merged into the full-precision base (to serve "
                  "it in 4 or 8 bits, load OUT with transformers' BitsAndBytesConfig)")  # fmt: skip
        return
    print_report(export_capped(args.source, args.out, args.max_rank, args.tau, args.overwrite))


def export_capped(
    source: str, out: str, max_rank: int | None, tau: float | None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the re-compressed adapter of ``source`` to ``out``; returns (and writes) the report."""
    if max_rank is None and tau is None:
        raise ConfigError("give --max-rank and/or --tau to re-compress (or --merge to merge)")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"--max-rank must be >= 1, got {max_rank}")
    if tau is not None and not 0 < tau <= 1:
        raise ConfigError(f"--tau must be in (0, 1], got {tau}")
    src = adapter_dir(source)
    check_output(out, [str(src)])  # -o never replaces or lies inside the adapter it reads
    adapter = read_adapter(src)
    validate_updates([adapter.to_update(str(src), 1.0)])
    modules, report = {}, {}
    for name, f in adapter.modules.items():
        modules[name], kept = compress(f, max_rank, tau)
        report[name] = {"rank_before": f.rank, "rank": modules[name].rank, "energy_kept": kept}
    summary = {"source": str(src), "max_rank": max_rank, "tau": tau, "modules": report,
               "min_energy_kept": min(r["energy_kept"] for r in report.values())}  # fmt: skip
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_adapter_files(tmp, modules, base_model=adapter.base_model_name_or_path,
                           fan_in_fan_out=adapter.fan_in_fan_out)  # fmt: skip
        write_json_atomic(tmp / REPORT, summary)
    return summary


def export_merged(source: str, out: str, base: str | None, overwrite: bool = False) -> dict[str, Any]:
    """Merge the adapter of ``source`` into ``base`` (default: the adapter's own base model) and save it."""
    from peft import PeftModel

    from florist.client.model import check_base_fits, load_model

    src = adapter_dir(source)
    check_output(out, [str(src)])
    adapter = read_adapter(src)
    validate_updates([adapter.to_update(str(src), 1.0)])
    base = base or florist_base(src) or adapter.base_model_name_or_path
    if not base:
        raise ConfigError(f"{str(src)!r} names no base model: give --base")
    model, tokenizer = load_model(base)
    check_base_fits(adapter, model, str(src), base)
    merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        trained_on = trained_quantization(src)
        write_json_atomic(tmp / REPORT, {"source": str(src), "base_model": base, "merged": True,
                                         "trained_on_quantized_base": trained_on})  # fmt: skip
    return {"source": str(src), "base_model": base, "out": out, "modules": len(adapter.modules),
            "trained_on": trained_on}  # fmt: skip


def print_report(summary: dict[str, Any]) -> None:
    if "modules" in summary and isinstance(summary["modules"], dict):
        ranks = [m["rank"] for m in summary["modules"].values()]
        before = [m["rank_before"] for m in summary["modules"].values()]
        print(f"{len(ranks)} modules: rank {min(before)}-{max(before)} -> {min(ranks)}-{max(ranks)}; "
              f"energy kept >= {summary['min_energy_kept']:.4f} (per module: {REPORT})")  # fmt: skip
    else:
        print(json.dumps(summary, indent=2))
