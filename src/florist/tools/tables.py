"""Rich tables for the CLI: the aggregation report and the inspection of one adapter."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _ranks(ranks: list[int]) -> str:
    return str(ranks[0]) if len(set(ranks)) == 1 else ",".join(map(str, ranks))


def aggregation_table(report: dict[str, Any]) -> Table:
    """One row per module: client ranks, global rank, energy kept, bytes; totals in the footer."""
    k = len(report["clients"])
    table = Table(title=f"{report['method']}: {k} clients, wire {report['wire_dtype']}", show_footer=True)
    table.add_column("module", footer="total", no_wrap=True)
    table.add_column("shape")
    table.add_column("client ranks")
    table.add_column("rank", justify="right", footer=str(sum(m["rank"] for m in report["modules"].values())))
    table.add_column("energy kept", justify="right")
    table.add_column("uplink", justify="right", footer=human_bytes(report["uplink_bytes"]))
    table.add_column("downlink", justify="right", footer=human_bytes(report["downlink_bytes"]))
    for name, m in report["modules"].items():
        energy = "-" if m["energy_kept"] is None else f"{m['energy_kept']:.4f}"
        shape = "x".join(map(str, m["shape"]))
        table.add_row(
            name,
            shape,
            _ranks(m["client_ranks"]),
            str(m["rank"]),
            energy,
            human_bytes(m["uplink_bytes"]),
            human_bytes(m["downlink_bytes"]),
        )
    return table


def make_console() -> Console:
    """A console wide enough for full module names, also when output goes to a file or pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_aggregation(report: dict[str, Any], out: str, console: Console | None = None) -> None:
    console = console or make_console()
    console.print(aggregation_table(report))
    weights = ", ".join(f"{c['id']}={c['weight']:.3f}" for c in report["clients"])
    console.print(f"weights p_k: {weights}")
    console.print(
        f"uplink {human_bytes(report['uplink_bytes'])}, downlink {human_bytes(report['downlink_bytes'])} "
        f"(all clients, one round); efficiency {report['efficiency_e-4']:.2f} x 1e-4; "
        f"server time {report['server_seconds']:.3f} s"
    )
    console.print(
        f"global adapter written to {out} (load with peft.PeftModel.from_pretrained(base, {out!r}))"
    )


def inspect_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "module",
        "shape",
        "rank",
        "scaling",
        "|dW|_F",
        "top singular values",
        "rank@90%",
        "rank@99%",
    ):
        left = col in ("module", "top singular values")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "top singular values")
    for r in rows:
        table.add_row(
            r["module"],
            "x".join(map(str, r["shape"])),
            str(r["rank"]),
            f"{r['scaling']:.4g}",
            f"{r['norm']:.4g}",
            " ".join(f"{s:.3g}" for s in r["singular_values"][:4]),
            str(r["rank_90"]),
            str(r["rank_99"]),
        )
    return table
