"""``florist inspect DIR``: ranks, shapes, scaling and the singular value spectrum of each module."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from florist.aggregation.linalg import factored_svd
from florist.aggregation.rank_policy import rank_for_energy
from florist.lora.peft_io import adapter_dir, read_adapter
from florist.lora.validation import validate_updates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> None:
    from florist.tables import human_bytes, inspect_table, make_console

    info = inspect_adapter(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    console = make_console()
    console.print(inspect_table(info["modules"], f"{args.dir} (base model {info['base_model']})"))
    console.print(f"{len(info['modules'])} modules, {human_bytes(info['file_bytes'])} on disk")


def inspect_adapter(path: str) -> dict[str, Any]:
    """Per module: shape, rank, scaling, Frobenius norm of scaling*B@A and its singular values."""
    path = str(adapter_dir(path))  # a run directory's final adapter, or an adapter
    adapter = read_adapter(path)
    validate_updates([adapter.to_update(path, 1.0)])  # NaN, Inf or an overflowing scale: named, not printed
    rows = []
    for name, f in adapter.modules.items():
        B, A = f.effective(torch.float64)  # (m, r), (r, n)
        S = factored_svd(B, A).S
        rows.append(
            {
                "module": name,
                "shape": list(f.shape),
                "rank": f.rank,
                "scaling": f.scaling,
                "norm": float(S.norm()),
                "singular_values": S.tolist(),
                "rank_90": rank_for_energy(S, 0.9),
                "rank_99": rank_for_energy(S, 0.99),
            }
        )
    nbytes = (Path(path) / "adapter_model.safetensors").stat().st_size
    return {
        "path": path,
        "base_model": adapter.base_model_name_or_path,
        "modules": rows,
        "file_bytes": nbytes,
    }
