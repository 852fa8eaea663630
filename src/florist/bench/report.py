"""What a comparison leaves behind: the table in the paper's layout and the plots.

table.md            method, accuracy (MMLU), held-out loss, efficiency, bytes, distance to exact
accuracy_bytes.png  final held-out loss and MMLU against downloaded bytes, a point per variant
ranks_heatmap.png   rank kept per layer and module at a few tau (FLoRIST)
spectrum.png        singular values of the aggregated update for a few layers
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from florist.tools.tables import human_bytes

LAYER = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)$")
BASE = "base model (round 0)"  # the model before any fine-tuning: no bytes, no ranks


def final(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return records[-1]


def total_down(records: Sequence[Mapping[str, Any]]) -> int:
    return int(sum(r["bytes_down"] for r in records))


def table_rows(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, records in results.items():
        last = final(records)
        ev = last.get("eval", {})
        if last["round"] == 0:
            rows.append({"method": name, "mmlu": ev.get("mmlu_micro"), "heldout_loss": ev.get("heldout_loss"),
                         "efficiency": None, "download_bytes": 0, "upload_bytes": 0, "rank_total": 0,
                         "rel_error": None})  # fmt: skip
            continue
        rows.append(
            {
                "method": name,
                "mmlu": ev.get("mmlu_micro"),
                "heldout_loss": ev.get("heldout_loss"),
                "efficiency": sum(r["efficiency_e-4"] for r in records) / len(records),
                "download_bytes": total_down(records),
                "upload_bytes": int(sum(r["bytes_up"] for r in records)),
                "rank_total": last["rank_total"],
                "rel_error": sum(r["rel_error_vs_exact"] for r in records) / len(records),
            }
        )
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    head = (
        f"### {title}\n\n| method | MMLU micro (%) | held-out loss | efficiency (1e-4) "
        "| downloaded (all clients, all rounds) | uploaded (all clients) "
        "| global rank (last round) | rel. error vs exact |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        mmlu = "-" if r["mmlu"] is None else f"{100 * r['mmlu']:.2f}"
        loss = "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}"
        down, up = human_bytes(r["download_bytes"]), human_bytes(r["upload_bytes"])
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}"
        lines.append(
            f"| {r['method']} | {mmlu} | {loss} | {eff} | {down} | {up} | {r['rank_total']} | {err} |"
        )
    return head + "\n".join(lines) + "\n"


def plot_accuracy_bytes(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "heldout_loss", "held-out loss, last round (lower is better)"),
        (axes[1], "mmlu", "MMLU micro"),
    ):
        for r in rows:
            if r[key] is None:
                continue
            if r["method"] == BASE:  # no bytes: a line, not a point on the log axis
                ax.axhline(r[key], color="grey", linestyle="--", linewidth=1, label=BASE)
                ax.legend(fontsize=7)
                continue
            ax.scatter(r["download_bytes"] / 1e6, r[key], s=30)
            ax.annotate(
                r["method"],
                (r["download_bytes"] / 1e6, r[key]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("downloaded by all clients over all rounds (MB, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[int], list[str], list[list[int]]]:
    """(layers, modules, grid[module][layer]) from per-module ranks."""
    cells: dict[tuple[int, str], int] = {}
    for name, r in ranks.items():
        m = LAYER.search(name)
        if m:
            cells[(int(m.group(1)), m.group(2))] = r
    layers = sorted({k[0] for k in cells})
    modules = sorted({k[1] for k in cells})
    return layers, modules, [[cells.get((layer, mod), 0) for layer in layers] for mod in modules]


def plot_rank_heatmaps(ranks_by_variant: Mapping[str, Mapping[str, int]], path: Path) -> None:
    n = len(ranks_by_variant)
    fig, axes = plt.subplots(n, 1, figsize=(12, 1.2 + 1.1 * n), squeeze=False)
    vmax = max((max(r.values()) for r in ranks_by_variant.values() if r), default=1)
    for ax, (name, ranks) in zip(axes[:, 0], ranks_by_variant.items(), strict=True):
        layers, modules, grid = rank_grid(ranks)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(modules)), modules)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
        ax.set_title(name, fontsize=9)
    fig.subplots_adjust(hspace=0.7)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="rank kept")
    axes[-1, 0].set_xlabel("layer")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(spectra: Mapping[str, Sequence[float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in spectra.items():
        ax.semilogy(
            range(1, len(s) + 1),
            s,
            marker=".",
            label=name.replace("model.layers.", "L").replace("self_attn.", ""),
        )
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value sigma_i of sum_k p_k B_k A_k")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rewrite_tables(out: Path, tolerance: float = 0.01) -> None:
    """Regenerate table.md's method tables and the accuracy plots from ``out/results.json``.

    The rank heatmap, the spectrum and the layer-wise table need the aggregation results themselves
    and are left as the bench wrote them.
    """
    import json

    from florist.bench.compare import pick_o_e, picks_text

    results = json.loads((out / "results.json").read_text())
    old = (out / "table.md").read_text()
    layer = old[old.index("### Rank kept per layer") :] if "### Rank kept per layer" in old else ""
    parts = []
    for setting, res in results.items():
        rows = table_rows(res)
        parts += [markdown_table(rows, f"{setting} ranks"), picks_text(pick_o_e(rows, tolerance), tolerance)]
        plot_accuracy_bytes(rows, out / f"accuracy_bytes_{setting}.png", f"{setting} ranks")
    (out / "table.md").write_text("\n".join([*parts, layer]))
