"""The regime study's table and plot, from its ``results.json`` (``florist regime --report-only``).

table.md        per cell: FLoRIST's kept rank at each tau, bytes of round 1 (all clients) of FedIT,
                FLoRA and FLoRIST, the round's error against the exact aggregate, and the paired
                held-out loss difference against the exact aggregate with its 95 % interval
kept_rank.png   kept rank (all adapted matrices) against examples per round, one line per
                (effective batch, init), a panel per tau, FedIT's rank as the reference line
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from florist.fsutil import save_figure
from florist.tables import human_bytes

RANK_TICKS = (100, 200, 500, 1000, 2000, 5000)


def florist_names(cell: Mapping[str, Any]) -> list[str]:
    return [m for m in cell["methods"] if m.startswith("FLoRIST")]


def paired_text(p: Mapping[str, Any]) -> str:
    return f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"


def cell_order(cells: Mapping[str, Any]) -> list[str]:
    return sorted(cells, key=lambda k: (cells[k]["init"], cells[k]["batch"], cells[k]["examples"]))


def rank_table(cells: Mapping[str, Any]) -> str:
    keys = cell_order(cells)
    taus = florist_names(cells[keys[0]])
    head = "| init | batch | examples/round | steps | " + " | ".join(t.removeprefix("FLoRIST ") for t in taus)
    lines = [head + " | FedIT |", "|" + "---|" * (len(taus) + 5)]
    for k in keys:
        c = cells[k]
        ranks = " | ".join(str(c["methods"][t]["rank_total"]) for t in taus)
        fedit = c["methods"]["FedIT"]["rank_total"]
        lines.append(f"| {c['init']} | {c['batch']} | {c['examples']} | {c['steps']} | {ranks} | {fedit} |")
    return "\n".join(lines) + "\n"


def bytes_table(cells: Mapping[str, Any], tau: str) -> str:
    lines = [
        f"| init | batch | examples/round | FedIT up+down | FLoRA up+down | {tau} up+down "
        f"| {tau} / FedIT | FedIT error | {tau} error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in cell_order(cells):
        c, m = cells[k], cells[k]["methods"]
        tot = {n: m[n]["bytes_up"] + m[n]["bytes_down"] for n in ("FedIT", "FLoRA", tau)}
        lines.append(
            f"| {c['init']} | {c['batch']} | {c['examples']} | {human_bytes(tot['FedIT'])} | "
            f"{human_bytes(tot['FLoRA'])} | {human_bytes(tot[tau])} | {tot[tau] / tot['FedIT']:.2f} | "
            f"{m['FedIT']['rel_error_vs_exact']:.3f} | {m[tau]['rel_error_vs_exact']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def loss_table(cells: Mapping[str, Any]) -> str:
    keys = cell_order(cells)
    names = [n for n in cells[keys[0]]["methods"] if n != "FLoRA"]
    lines = [
        "| init | batch | examples/round | FLoRA - base | "
        + " | ".join(f"{n} - FLoRA" for n in names)
        + " |",
        "|" + "---|" * (len(names) + 4),
    ]
    for k in keys:
        c, m = cells[k], cells[k]["methods"]
        diffs = " | ".join(paired_text(m[n]["paired_vs_flora"]) for n in names)
        base = paired_text(m["FLoRA"]["paired_vs_base"])
        lines.append(f"| {c['init']} | {c['batch']} | {c['examples']} | {base} | {diffs} |")
    return "\n".join(lines) + "\n"


def tokens_table(cells: Mapping[str, Any]) -> str:
    lines = ["| init | batch | examples/round | tokens per client (min / mean / max) | label tokens (mean) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k in cell_order(cells):
        c = cells[k]
        tokens = [v["tokens"] for v in c["clients"].values()]
        labels = [v["label_tokens"] for v in c["clients"].values()]
        spread = f"{min(tokens):,} / {sum(tokens) // len(tokens):,} / {max(tokens):,}"
        lines.append(
            f"| {c['init']} | {c['batch']} | {c['examples']} | {spread} | {sum(labels) // len(labels):,} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: Mapping[str, Any], tau: str = "FLoRIST tau=0.90") -> str:
    cells = results["cells"]
    return "\n".join([
        "### FLoRIST kept rank, summed over the adapted matrices (round 1)\n", rank_table(cells),
        "### Bytes of round 1, all clients, and the round's relative error against the exact aggregate\n",
        bytes_table(cells, tau),
        "### Paired held-out loss difference against the exact aggregate (FLoRA), nats, 95 % interval\n",
        loss_table(cells), "### Tokens each client trained on in the round\n", tokens_table(cells),
    ])  # fmt: skip


def plot_kept_rank(results: Mapping[str, Any], path: Path, taus: Sequence[str] | None = None) -> None:
    cells = results["cells"]
    keys = cell_order(cells)
    taus = list(taus or florist_names(cells[keys[0]]))
    fig, axes = plt.subplots(1, len(taus), figsize=(3.6 * len(taus), 3.8), sharey=True, squeeze=False)
    lines: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = {}
    for k in keys:
        c = cells[k]
        lines.setdefault((c["init"], c["batch"]), []).append((c["examples"], c["methods"]))
    fedit = cells[keys[0]]["methods"]["FedIT"]["rank_total"]
    for ax, tau in zip(axes[0], taus, strict=True):
        for (init, batch), pts in sorted(lines.items()):
            pts.sort(key=lambda t: t[0])
            style = "-" if init == "shared" else "--"
            ax.plot([e for e, _ in pts], [m[tau]["rank_total"] for _, m in pts], style, marker="o",
                    label=f"batch {batch}, {init}")  # fmt: skip
        ax.axhline(fedit, color="grey", linewidth=1, linestyle=":", label=f"FedIT ({fedit})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({c["examples"] for c in cells.values()})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_yticks(RANK_TICKS, [str(t) for t in RANK_TICKS])
        ax.set_title(tau.removeprefix("FLoRIST "), fontsize=10)
        ax.set_xlabel("examples per client per round")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("rank kept, summed over matrices")
    axes[0, -1].legend(fontsize=7, loc="upper left")
    fig.suptitle("FLoRIST's kept rank in round 1 (lower = fewer download bytes)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
