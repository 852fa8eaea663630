"""What a comparison leaves behind: the table and the plots, all from ``results.json``.

table.md                   per setting: final held-out loss, its paired difference against FLoRA
                           (95 % interval, clustered by row), total bytes (uplink + downlink, all
                           clients, all rounds) and its ratio to FLoRA's and FedIT's, the mean round
                           error against the exact FedAvg (one definition for every method), and the
                           last round's global rank and efficiency (the same round)
bytes_loss_<setting>.png   paired loss difference against FLoRA vs total bytes, a point per variant
ranks_heatmap.png          rank kept per layer and module (round 1), one colour scale for all panels
spectrum.png               singular values of round 1's exact aggregate: first, middle and last layers
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

from florist.eval.heldout import LossResult
from florist.eval.paired import paired_difference
from florist.fsutil import save_figure, write_text_atomic
from florist.tables import human_bytes

LAYER = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)$")
BASE = "base model (round 0)"  # the model before any fine-tuning: no bytes, no ranks
REFERENCE = "FLoRA"  # the exact aggregate every paired difference is taken against
SETTINGS = ("homogeneous", "heterogeneous")


def loss_of(ev: Mapping[str, Any]) -> LossResult | None:
    """The held-out loss of an eval record with rows (``Evaluator(rows=True)``), else None."""
    if "heldout_rows" not in ev:
        return None
    rows = [float("nan") if x is None else float(x) for x in ev["heldout_rows"]]
    return LossResult(
        ev["heldout_loss"], ev["perplexity"], sum(ev["heldout_tokens"]), rows, ev["heldout_tokens"]
    )


def table_rows(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    ref = loss_of(results[REFERENCE][-1]["eval"]) if REFERENCE in results else None
    totals = {name: total_bytes(recs) for name, recs in results.items()}
    rows = []
    for name, records in results.items():
        last, loss = records[-1], loss_of(records[-1].get("eval", {}))
        paired = paired_difference(ref, loss).to_dict() if ref is not None and loss is not None else None
        trained = [r for r in records if r["round"] > 0]
        rows.append({
            "method": name, "heldout_loss": last.get("eval", {}).get("heldout_loss"), "paired": paired,
            "bytes_up": sum(r["bytes_up"] for r in trained),
            "bytes_down": sum(r["bytes_down"] for r in trained),
            "total_bytes": totals[name],
            "vs_flora": totals[name] / totals[REFERENCE] if totals.get(REFERENCE) else None,
            "vs_fedit": totals[name] / totals["FedIT"] if totals.get("FedIT") else None,
            "round_error": sum(r["round_error"] for r in trained) / len(trained) if trained else None,
            "rank_total": last.get("rank_total"), "efficiency": last.get("efficiency_e-4"),
        })  # fmt: skip
    return rows


def total_bytes(records: Sequence[Mapping[str, Any]]) -> int:
    return int(sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in records))


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    head = (
        f"### {title}\n\n| method | held-out loss | vs FLoRA, paired (95 % CI) | total bytes (up + down) "
        "| uplink | downlink | x FLoRA | x FedIT | round error | rank (last round) "
        "| efficiency (last round) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        p = r["paired"]
        paired = "-" if p is None else f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"
        lines.append(
            f"| {r['method']} | {_f(r['heldout_loss'], '.4f')} | {paired} | "
            f"{human_bytes(r['total_bytes'])} | "
            f"{human_bytes(r['bytes_up'])} | {human_bytes(r['bytes_down'])} | {_f(r['vs_flora'], '.3f')} | "
            f"{_f(r['vs_fedit'], '.3f')} | {_f(r['round_error'], '.4f')} | {r['rank_total'] or '-'} | "
            f"{_f(r['efficiency'], '.2f')} |"
        )
    return head + "\n".join(lines) + "\n"


def goal(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.005, factor: float = 10.0) -> list[str]:
    """FLoRIST variants within ``tolerance`` nats of FLoRA (paired mean), ``factor`` x fewer total bytes
    than FLoRA and fewer than FedIT: the headline goal."""
    return [
        r["method"] for r in rows
        if r["method"].startswith("FLoRIST") and r["paired"] is not None and r["paired"]["mean"] <= tolerance
        and r["vs_flora"] is not None and r["vs_flora"] <= 1 / factor and r["vs_fedit"] is not None
        and r["vs_fedit"] < 1
    ]  # fmt: skip


def goal_verdict(met: Sequence[str], variants: Mapping[str, Any]) -> str:
    """Who meets the goal; without FLoRA or FedIT in the run it cannot be judged, and says so."""
    missing = [m for m in (REFERENCE, "FedIT") if m not in variants]
    if met:
        return "met by " + ", ".join(met)
    return f"cannot be judged: {' and '.join(missing)} not run" if missing else "not met"


def plot_bytes_loss(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Paired difference against FLoRA (with its interval) vs total bytes; a legend, not labels."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    markers = "osD^v<>pPX*h"
    tab10, tab20 = plt.get_cmap("tab10"), plt.get_cmap("tab20")
    colours = [tab10(j) for j in range(10)] + [tab20(2 * j + 1) for j in range(10)]  # then light shades
    # 20 colours and 12 markers: no two of the first 60 rows share both (Dark2 repeated tab10's greens)
    for i, r in enumerate(x for x in rows if x["paired"] is not None):
        p = r["paired"]
        if r["method"] == BASE:  # far above the methods: named in the legend, not drawn
            ax.plot([], [], " ", label=f"{BASE}: {p['mean']:+.4f} (off the scale)")
            continue
        ax.errorbar(r["total_bytes"] / 1e6, p["mean"], yerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]],
                    fmt=markers[i % len(markers)], color=colours[i % len(colours)], capsize=3,
                    label=r["method"])  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.6)
    flora = next((r["total_bytes"] for r in rows if r["method"] == REFERENCE), None)
    if flora:
        ax.axvline(
            flora / 10 / 1e6, color="green", linestyle=":", linewidth=1, label="goal: <= FLoRA's bytes / 10"
        )
        ax.axhline(0.005, color="green", linestyle="--", linewidth=1, label="goal: <= FLoRA's loss + 0.005")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 20, 50, 100, 200 ...
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overprint each other
    ax.set_xlabel("total bytes: uplink + downlink, all clients, all rounds (MB, log scale)")
    ax.set_ylabel("final held-out loss - FLoRA's, paired (nats; lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing is drawn against FLoRA when FLoRA did not run
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
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


def layer_sorted(names: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Module names in numeric layer order (layer 2 before layer 10), then by name."""

    def key(name: str) -> tuple[int, str]:
        m = LAYER.search(name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)


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
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="rank kept (one scale for all panels)")
    axes[-1, 0].set_xlabel("layer")
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_spectra(spectra: Mapping[str, Sequence[float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in spectra.items():
        label = name.replace("base_model.model.", "").replace("model.layers.", "L").replace("self_attn.", "")
        ax.semilogy(range(1, len(s) + 1), s, marker=".", label=label)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value sigma_i of sum_k p_k B_k A_k")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def pick_o_e(rows: Sequence[Mapping[str, Any]], tolerance: float) -> dict[str, str | None]:
    """FLoRIST-O: the plain-tau variant with the lowest final loss; FLoRIST-E: the one with the fewest
    total bytes whose loss is within ``tolerance`` of O's."""
    taus = [
        r for r in rows if re.fullmatch(r"FLoRIST tau=[\d.]+", r["method"]) and r["heldout_loss"] is not None
    ]
    if not taus:
        return {"O": None, "E": None}
    best = min(taus, key=lambda r: r["heldout_loss"])
    ok = [r for r in taus if r["heldout_loss"] <= best["heldout_loss"] + tolerance]
    return {"O": best["method"], "E": min(ok, key=lambda r: r["total_bytes"])["method"]}


def collapse_table(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Per method and round, the share of the global update's energy beyond the smallest client
    rank (raFLoRA's rank collapse: a share falling round after round); empty when not recorded."""
    rows = {m: rs for m, rs in results.items() if rs and "energy_beyond_min_rank" in rs[-1]}
    if not rows:
        return ""
    rounds = max(len(rs) for rs in rows.values())
    head = " | ".join(f"round {t}" for t in range(1, rounds + 1))
    lines = [
        "\nShare of the global update's energy beyond the smallest client rank (rank collapse):\n",
        f"| method | {head} |",
        "|---|" + "---|" * rounds,
    ]
    for method, rs in rows.items():
        cells = " | ".join(_f(r.get("energy_beyond_min_rank"), ".4f") for r in rs)
        lines.append(f"| {method} | {cells} |")
    return "\n".join(lines) + "\n"


def write_all(out: Path, results: Mapping[str, Any], tolerance: float) -> tuple[str, dict[str, Any]]:
    """Tables and plots of every setting in ``results``; returns the markdown and the picks."""
    parts, picks = [], {}
    for setting in (s for s in SETTINGS if s in results):
        rows = table_rows(results[setting])
        met = goal(rows)
        picks[setting] = pick_o_e(rows, tolerance) | {"goal_met_by": met}
        parts.append(markdown_table(rows, f"{setting} ranks"))
        if setting == "heterogeneous":
            parts.append(collapse_table(results[setting]))
        parts.append(
            f"\nGoal (within 0.005 nats of FLoRA, >= 10x fewer total bytes than FLoRA, fewer than FedIT): "
            f"{goal_verdict(met, results[setting])}.\n"
        )
        plot_bytes_loss(rows, out / f"bytes_loss_{setting}.png", f"{setting} ranks")
    return "\n".join(parts), picks


def rewrite_tables(out: Path, tolerance: float = 0.005) -> None:
    """Regenerate table.md's method tables and the plots from ``out/results.json`` (keeps the layer part)."""
    import json

    results = json.loads((out / "results.json").read_text())
    old = (out / "table.md").read_text() if (out / "table.md").exists() else ""
    marker = "\n### Rank kept per layer"
    layer = old[old.index(marker) :] if marker in old else ""
    text, _ = write_all(out, results, tolerance)
    write_text_atomic(out / "table.md", text + layer)
