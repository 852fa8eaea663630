"""``florist aggregate``: N PEFT LoRA adapter directories in, one global PEFT adapter out.

    florist aggregate --method florist --tau 0.9 client_a/ client_b/ client_c/ -o global/

Weights ``p_k = n_k / sum(n)`` come from ``--weights``, else from ``num_examples`` in a
``florist.json`` beside each adapter, else are equal. The output directory (written atomically)
holds the global adapter, ``per_client/<name>/`` adapters when clients download different
factors (FlexLoRA; FedIT and FFA-LoRA with mixed ranks), and ``florist_aggregation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florist.aggregation import (
    AggregationResult,
    CommReport,
    communication,
    efficiency,
)
from florist.cli_parsing import finite, floats
from florist.config.schema import AggregationConfig
from florist.errors import ConfigError, InvalidUpdate
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora import ClientUpdate
from florist.lora.peft_io import PeftAdapter, read_adapter, save_adapter_files

log = logging.getLogger(__name__)
SIDECAR = "florist.json"
REPORT = "florist_aggregation.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from florist.aggregation import available

    p.add_argument("dirs", nargs="+", metavar="DIR", help="PEFT adapter directories, one per client")
    p.add_argument("-o", "--out", required=True, help="output directory (PEFT adapter + report)")
    p.add_argument("--method", default="florist", choices=available())
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--tau", type=finite, help="florist: energy threshold in (0, 1] (default 0.9)")
    rank.add_argument("--rank", type=int, help="florist: fixed rank for every module")
    rank.add_argument(
        "--budget-mb", type=finite, help="florist: download budget per client, in MB (1e6 bytes)"
    )
    p.add_argument("--min-rank", type=int, default=1)
    p.add_argument("--max-rank", type=int)
    p.add_argument(
        "--weights", type=floats, help="n_k per client, in the order of DIR (default: florist.json)"
    )
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.add_argument(
        "--basis", default="qr", choices=["qr", "svd"], help="florist: how the stacks are factored"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def main(args: argparse.Namespace) -> None:
    from florist.tables import print_aggregation

    aggregation = AggregationConfig(
        method=args.method, tau=args.tau, rank=args.rank, budget_mb=args.budget_mb,
        min_rank=args.min_rank, max_rank=args.max_rank, dtype=args.dtype, basis=args.basis,
    )  # fmt: skip
    if aggregation.misfits():  # before any input is read
        raise ConfigError(f"--tau, --rank and --budget-mb apply to --method florist, not {args.method!r}")
    opts = AggregateJob(aggregation, args.weights, args.wire_dtype, args.overwrite)
    report = run_aggregate(args.dirs, args.out, opts)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_aggregation(report, args.out)


def load_clients(
    dirs: Sequence[str], weights: Sequence[float] | None
) -> tuple[list[ClientUpdate], PeftAdapter]:
    """Read every adapter directory; returns the updates and the first adapter (for base-model info)."""
    if not dirs:
        raise ConfigError("no adapter directories given")
    if weights is not None and len(weights) != len(dirs):
        raise ConfigError(f"--weights has {len(weights)} values for {len(dirs)} adapter directories")
    for d, w in zip(dirs, weights or (), strict=False):
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"--weights: the weight of {d!r} must be a positive finite number, got {w}")
    _check_distinct(dirs)
    adapters = [read_adapter(d, client=d) for d in dirs]
    _check_compatible(dirs, adapters)
    sizes = _sizes(dirs, weights)
    return [a.to_update(d, s) for d, a, s in zip(dirs, adapters, sizes, strict=True)], adapters[0]


def _check_distinct(dirs: Sequence[str]) -> None:
    """One adapter given twice (``c0 c0/``, a symlink and its target) would count twice."""
    seen: dict[Path, str] = {}
    for d in dirs:
        real = Path(d).resolve()
        if real in seen:
            raise ConfigError(f"adapter {d!r} is the same directory as {seen[real]!r}: each client once")
        seen[real] = d


def check_output(out: str, dirs: Sequence[str]) -> None:
    """``-o`` may neither be an input nor lie inside one (an overwrite would destroy it)."""
    target = Path(out).resolve()
    for d in dirs:
        src = Path(d).resolve()
        if target == src or src in target.parents:
            raise ConfigError(
                f"output {out!r} is, or lies inside, the input adapter {d!r}; choose another -o"
            )
        if target in src.parents and Path(out).exists():
            raise ConfigError(f"output {out!r} holds the input adapter {d!r}; --overwrite would delete it")


def _sizes(dirs: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """``n_k`` per client: ``--weights``, else each sidecar's ``num_examples``, else all equal."""
    if weights is not None:
        return [float(w) for w in weights]
    found = [_sidecar_size(Path(d)) for d in dirs]
    sizes = [s for s in found if s is not None]
    if len(sizes) < len(dirs):
        log.info("no --weights and not every client has num_examples in %s: weighting equally", SIDECAR)
        return [1.0] * len(dirs)
    return sizes


def _sidecar_size(root: Path) -> float | None:
    path = root / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {err}") from err
    value = data.get("num_examples") if isinstance(data, dict) else None
    if value is None and not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object with num_examples")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{str(path)!r}: num_examples must be a positive finite number, got {value!r:.40}")
    return float(value)


def _check_compatible(dirs: Sequence[str], adapters: Sequence[PeftAdapter]) -> None:
    first = adapters[0]
    for d, a in zip(dirs, adapters, strict=True):
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise InvalidUpdate(d, f"fan_in_fan_out={a.fan_in_fan_out} differs from {dirs[0]!r}")
        if not _same_base(a.base_model_name_or_path, first.base_model_name_or_path):
            raise InvalidUpdate(
                d,
                f"trained on base model {a.base_model_name_or_path!r}, but {dirs[0]!r} on "
                f"{first.base_model_name_or_path!r}: adapters of different bases cannot be aggregated "
                "(the same weights under two names? make adapter_config.json base_model_name_or_path agree)",
            )


def _same_base(a: str | None, b: str | None) -> bool:
    """The same name, or two paths to the same local directory."""
    if a == b:
        return True
    if a and b and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


@dataclass(frozen=True)
class AggregateJob:
    """What ``florist aggregate`` does: the ``[aggregation]`` options (the config's own type) and the
    command's: client weights (else each adapter's ``florist.json``), the wire dtype bytes are counted
    in (and a byte budget priced at), and whether ``out`` may be replaced."""

    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    weights: tuple[float, ...] | None = None
    wire_dtype: str = "float32"
    overwrite: bool = False

    def options(self) -> dict[str, Any]:
        """The options as the report lists them."""
        a = self.aggregation
        return {"method": a.method, "tau": a.tau, "rank": a.rank, "budget_mb": a.budget_mb,
                "min_rank": a.min_rank, "max_rank": a.max_rank, "weights": self.weights,
                "wire_dtype": self.wire_dtype, "dtype": a.dtype, "basis": a.basis}  # fmt: skip


def run_aggregate(dirs: Sequence[str], out: str, opts: AggregateJob) -> dict[str, Any]:
    """Aggregate ``dirs`` into ``out``; returns the report (also written to ``out/{REPORT}``)."""
    aggregator = opts.aggregation.build(opts.wire_dtype)
    check_output(out, dirs)
    updates, first = load_clients(dirs, opts.weights)
    result = aggregator.aggregate(updates)
    comm = communication(updates, result, opts.wire_dtype)
    report = build_report(updates, result, comm, opts)
    base, fan = first.base_model_name_or_path, first.fan_in_fan_out
    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        save_adapter_files(tmp, result.global_update, base_model=base, fan_in_fan_out=fan)
        if result.per_client is not None:
            for cid, name in _client_dir_names(result.client_ids).items():
                (tmp / "per_client" / name).mkdir(parents=True)
                save_adapter_files(
                    tmp / "per_client" / name, result.download(cid), base_model=base, fan_in_fan_out=fan
                )
        write_json_atomic(tmp / REPORT, report)
    return report


def _client_dir_names(client_ids: Sequence[str]) -> dict[str, str]:
    names = [Path(c).name or f"client_{i}" for i, c in enumerate(client_ids)]
    if len(set(names)) < len(names):
        names = [f"{i:02d}_{n}" for i, n in enumerate(names)]
    return dict(zip(client_ids, names, strict=True))


def build_report(
    updates: Sequence[ClientUpdate], result: AggregationResult, comm: CommReport, opts: AggregateJob
) -> dict[str, Any]:
    """A JSON-serialisable summary: per-module ranks, energy and bytes, totals, efficiency, time."""
    by_id = {u.client_id: u for u in updates}
    modules = {}
    down = comm.per_module("downlink")
    up = comm.per_module("uplink")
    for name, f in result.global_update.items():
        modules[name] = {
            "shape": list(f.shape),
            "client_ranks": [by_id[c].modules[name].rank for c in result.client_ids],
            "rank": f.rank,
            "energy_kept": None if result.energy_kept is None else result.energy_kept[name],
            "uplink_bytes": up[name],
            "downlink_bytes": down[name],
        }
    return {
        "method": result.method,
        "protocol": result.protocol.value,
        "options": opts.options(),
        "clients": [{"id": c, "weight": result.weights[c]} for c in result.client_ids],
        "modules": modules,
        "wire_dtype": comm.wire_dtype,
        "uplink_bytes": comm.uplink_total,
        "downlink_bytes": comm.downlink_total,
        "uplink_bytes_per_client": comm.uplink,
        "downlink_bytes_per_client": comm.downlink,
        "efficiency_e-4": efficiency(result),
        "server_seconds": result.seconds,
    }
