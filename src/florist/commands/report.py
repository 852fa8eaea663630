"""``florist report RUN``: a run's curves as PNGs in ``RUN/report/``, drawn from ``metrics.jsonl``.

curves.png   train and held-out loss (and exact match, when evaluated) against the round, and
             the same against cumulative bytes sent (uplink + downlink + catch-up, all clients)
ranks.png    the global rank of every adapted module in every round (one colour scale)
"""

from __future__ import annotations

import argparse
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from florist.errors import ConfigError
from florist.fsutil import save_figure
from florist.tables import read_metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory (with metrics.jsonl)")


def main(args: argparse.Namespace) -> None:
    for path in write_report(args.run):
        print(path)


def load_records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory (no metrics.jsonl)")
    records = read_metrics(path)
    if not any(r.get("round", 0) > 0 for r in records):
        raise ConfigError(f"{str(path)!r} holds no finished round yet")
    return records


def cumulative_mb(records: list[dict[str, Any]]) -> list[float]:
    """Bytes sent up to and including each record's round, in MB (round 0: nothing yet)."""
    total, out = 0, []
    for r in records:
        total += sum(int(r.get(k) or 0) for k in ("bytes_up", "bytes_down", "bytes_catchup"))
        out.append(total / 1e6)
    return out


def series(records: list[dict[str, Any]], key: str, in_eval: bool) -> tuple[list[int], list[float]]:
    """(indices, values) of the records that have ``key`` (in ``eval`` when ``in_eval``)."""
    idx, vals = [], []
    for i, r in enumerate(records):
        value = (r.get("eval") or {}).get(key) if in_eval else r.get(key)
        if isinstance(value, (int, float)):
            idx.append(i)
            vals.append(float(value))
    return idx, vals


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> None:
    rounds, mb = [r["round"] for r in records], cumulative_mb(records)
    metrics = [
        ("train_loss", False, "train loss (clients, weighted)"),
        ("heldout_loss", True, "held-out loss"),
        ("exact_match", True, "exact match"),
    ]
    shown = [(k, e, label) for k, e, label in metrics if series(records, k, e)[0]]
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 3.0 * len(shown)), squeeze=False)
    for row, (key, in_eval, label) in enumerate(shown):
        idx, vals = series(records, key, in_eval)
        for col, (xs, xlabel) in enumerate(((rounds, "round"), (mb, "cumulative bytes sent (MB)"))):
            ax = axes[row][col]
            ax.plot([xs[i] for i in idx], vals, marker="o", linestyle=line_style([rounds[i] for i in idx]))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_xticks(sorted(set(rounds)))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def line_style(measured_rounds: list[Any]) -> str:
    """Solid where every round between two points was measured; dotted where rounds were skipped
    (``eval.every`` > 1), so no line claims values between evaluations."""
    gaps = any(b - a > 1 for a, b in pairwise(measured_rounds))
    return ":" if gaps else "-"


def plot_ranks(records: list[dict[str, Any]], path: Path, title: str) -> None:
    rows = [r for r in records if r.get("ranks")]
    if not rows:
        return
    modules = sorted(rows[0]["ranks"], key=_layer_order)
    grid = [[r["ranks"].get(m, 0) for r in rows] for m in modules]  # (modules, rounds)
    fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(rows) + 3), max(4, 0.12 * len(modules) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(rows)), [str(r["round"]) for r in rows])
    step = max(1, len(modules) // 64)  # every module up to 64 rows, so no kind of module goes unlabelled
    ticks = list(range(0, len(modules), step))
    ax.set_yticks(
        ticks, [modules[i].replace("model.layers.", "L") for i in ticks], fontsize=5 if len(ticks) > 40 else 7
    )
    ax.set_xlabel("round")
    fig.colorbar(image, ax=ax, label="global rank")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]
    return (numbers[0] if numbers else -1, name)


def write_report(run: str | Path) -> list[Path]:
    """Draw the run's figures into ``RUN/report/``; returns their paths."""
    root = Path(run)
    records = load_records(root)
    method = next((r.get("method") for r in records if r.get("method")), None) or _method(root)
    out = root / "report"
    curves, ranks = out / "curves.png", out / "ranks.png"
    plot_curves(records, curves, f"{root.name} ({method}): loss against round and against bytes")
    plot_ranks(records, ranks, f"{root.name}: global rank per module and round")
    return [p for p in (curves, ranks) if p.exists()]


def _method(root: Path) -> str:
    import json

    cfg = root / "config.json"
    return (
        str(json.loads(cfg.read_text()).get("aggregation", {}).get("method", "?")) if cfg.is_file() else "?"
    )
