"""What the CLI prints: the aggregation report, one adapter's inspection, a run's rounds and summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


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


class _Console(Console):
    """Rich's console, but a reader that goes away (``florist inspect RUN | head``) ends the command
    as ``florist.cli`` ends every closed pipe, with status 0, not Rich's silent status 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def make_console() -> Console:
    """A console wide enough for full module names, also when output goes to a file or pipe."""
    console = _Console()
    return console if console.is_terminal else _Console(width=160)


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


def print_summary(summary: dict[str, Any], demo: bool = False, console: Any = None) -> None:
    """Per-round table, before/after, bytes, and where the adapter is and how to load it."""
    console = console or make_console()
    records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    console.print(rounds_table(records, summary["method"]))
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for key in ("exact_match", "heldout_loss", "mmlu_micro", "mmlu_macro"):
        if key in before or key in after:
            console.print(f"{key:>14}: before {_fmt(before.get(key))}  after {_fmt(after.get(key))}")
    console.print(bytes_line(summary))
    if (line := privacy_line(summary, records)) is not None:
        console.print(line)
    if "precision" in summary:
        p = summary["precision"]
        same = p["train"] == p["eval"]
        console.print(f"precision: {p['train']} for training and evaluation" if same
                      else f"precision: training {p['train']}; evaluation {p['eval']}")  # fmt: skip
    for r in records:
        if r["round"] > 0 and (r.get("skipped") or r.get("rejected") or r.get("timed_out")):
            console.print(reliability_line(r))
    sync = summary["sync"]
    if sync.get("clients_match_server"):
        console.print(
            f"all {len(sync['digests'])} clients hold the server's merged weights (sha256 digests agree)"
        )
    console.print(f"run directory: {summary['run_dir']}  (metrics.jsonl, config.toml, rounds/, summary.json)")
    console.print(f"global adapter (PEFT): {summary['adapter']}")
    console.print(load_snippet(summary.get("published_base") or summary["base_model"], summary["adapter"]))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` that read back: a line that is not a JSON object with an
    integer ``round`` (a torn last line after a full disk or a power loss) is skipped with a warning
    naming its line number."""
    out = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if (
            not isinstance(record, dict)
            or isinstance(record.get("round"), bool)
            or not isinstance(record.get("round"), int)
        ):
            log.warning("%s line %d is not a round record; skipped", path, number)
            continue
        out.append(record)
    return out


def epsilon_of(record: dict[str, Any]) -> float | None:
    """The privacy spent after a round: client-level DP's epsilon so far, else DP-SGD's worst client's."""
    if isinstance(eps := record.get("epsilon"), (int, float)):
        return float(eps)
    spent = [m["epsilon"] for m in (record.get("client_metrics") or {}).values()
             if isinstance(m, dict) and isinstance(m.get("epsilon"), (int, float))]  # fmt: skip
    return float(max(spent)) if spent else None


def privacy_line(summary: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    """What the run spent: client-level DP's guarantee, or DP-SGD's worst client after the last round."""
    if p := summary.get("privacy"):
        return (
            f"privacy: client-level DP, epsilon {p['epsilon']:.3g} at delta {p['delta']:g} (noise multiplier "
            f"{p['noise_multiplier']:g}, clip {p['clip']:g}, sample rate {p['sample_rate']:.3g})"
        )
    spent = [e for r in records if (e := epsilon_of(r)) is not None]
    return f"privacy: DP-SGD, the worst client's epsilon {spent[-1]:.3g}" if spent else None


def rounds_table(records: list[dict[str, Any]], method: str) -> Any:
    from rich.table import Table

    table = Table(title=f"{method}: one row per round")
    private = any(epsilon_of(r) is not None for r in records)
    for col in (
        "round",
        "clients",
        "train loss",
        "global rank",
        "uplink",
        "downlink",
        "catch-up",
        "EM",
        "held-out loss",
        *(["epsilon"] if private else []),
    ):
        table.add_column(col, justify="right")
    for r in records:
        ev = r.get("eval", {})
        eps = [_fmt(epsilon_of(r))] if private else []
        if r["round"] == 0:
            table.add_row("0 (base)", "", "", "", "", "", "", _fmt(ev.get("exact_match")),
                          _fmt(ev.get("heldout_loss")), *eps)  # fmt: skip
            continue
        if "skipped" in r:
            sent = (human_bytes(r[k]) for k in ("bytes_up", "bytes_down", "bytes_catchup"))
            table.add_row(str(r["round"]), "skipped", "", "", *sent, "", "", *eps)
            continue
        table.add_row(
            str(r["round"]), str(len(r["clients"])), _fmt(r["train_loss"]), str(r["rank_total"]),
            human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"]), human_bytes(r["bytes_catchup"]),
            _fmt(ev.get("exact_match")), _fmt(ev.get("heldout_loss")), *eps,
        )  # fmt: skip
    return table


def reliability_line(r: dict[str, Any]) -> str:
    """What went wrong in a round: skipped (why), clients left out (why), clients too slow."""
    parts = [f"round {r['round']}:"]
    if r.get("skipped"):
        parts.append(f"skipped ({r['skipped']})")
    parts += [f"{who} left out ({why})" for who, why in (r.get("rejected") or {}).items()]
    if r.get("timed_out"):
        parts.append(f"no reply in time from {', '.join(r['timed_out'])}")
    return " ".join(parts)


def bytes_line(summary: dict[str, Any]) -> str:
    up, down = human_bytes(summary["bytes_up"]), human_bytes(summary["bytes_down"])
    return (
        f"bytes sent: uplink {up}, downlink {down} "
        f"(of which catch-up for skipped rounds {human_bytes(summary['bytes_catchup'])}; "
        f"includes the final sync of every client)"
    )


def load_snippet(base: str, adapter: str) -> str:
    return (
        "load it with peft:\n"
        "  from transformers import AutoModelForCausalLM\n  from peft import PeftModel\n"
        f"  base = AutoModelForCausalLM.from_pretrained({base!r})\n"
        f"  model = PeftModel.from_pretrained(base, {adapter!r}).merge_and_unload()"
    )


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"
