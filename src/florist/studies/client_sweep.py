"""How FLoRIST's download scales with the number of clients: a client-count sweep.

    florist client-sweep [--out docs/results/clients] [--uploads runs/client-sweep-uploads]
                         [--counts 4,8,16,32] [--inits shared,per_client] [--total-examples 512] [k=v ...]

K clients are drawn from the same Dolly pool (every training row of the 8 paper clients, split again
over K clients by a Dirichlet split on the category, ``data.alpha``), with a fixed total number of
examples per round (``--total-examples``; each client trains ``total / K`` of them, batch 4), LoRA
rank 16 everywhere. For each init policy (``lora.init``) and K:

    round 1   every client trains from the base model; FLoRA, FedIT and FLoRIST at each tau are
              aggregated offline from the same uploads
    round 2   every client merges round 1's FLoRIST tau = ``--global-tau`` update (the method florist
              recommends) and trains again; the same methods aggregate the new uploads

Recorded per (init, K, round): FLoRIST's kept rank (summed over the adapted matrices) at each tau, and
the bytes each method sends down (all clients) and up. FLoRA's download grows with K (R = K r per
matrix, to every client: K^2 r (m + n) in all); FLoRIST's with the rank the aggregate really has.
Uploads are PEFT adapter dirs kept under ``--uploads``; a killed sweep continues where it stopped
(every finished (init, K, round) is kept in ``results.json``, every finished client's upload on disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florist.aggregation import communication, make_aggregator
from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.aggregation.rank_policy import EnergyThreshold
from florist.cli_parsing import floats, ints, names, study_arguments
from florist.client.local import client_from_config, client_id
from florist.client.lora_state import extract
from florist.client.model import load_model
from florist.config import PAPER_CONFIG, FloristConfig, load_config
from florist.data.federated import client_examples
from florist.errors import ConfigError
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora import ClientUpdate, LoraFactors
from florist.lora.peft_io import read_adapter, save_adapter_files
from florist.studies.provenance import check_meta, claim, fingerprint
from florist.studies.regime import methods

log = logging.getLogger(__name__)
MICRO_BATCH = 4


@dataclass(frozen=True)
class SweepOptions:
    config: str = PAPER_CONFIG
    overrides: tuple[str, ...] = ()
    out: str = "runs/client-sweep"
    uploads: str = "runs/client-sweep-uploads"
    counts: tuple[int, ...] = (4, 8, 16, 32)
    inits: tuple[str, ...] = ("shared", "per_client")
    total_examples: int = 512  # per round, all clients together
    taus: tuple[float, ...] = (0.95, 0.9, 0.8)
    global_tau: float = 0.9  # the round-1 update every client merges before round 2
    rounds: tuple[int, ...] = (1, 2)


def sweep_config(opts: SweepOptions, k: int, init: str) -> FloristConfig:
    """The paper config re-split over ``k`` clients, ``total_examples / k`` examples each per round."""
    per_client = max(MICRO_BATCH, opts.total_examples // k)
    keys = [
        "data.split='dirichlet'", f"federation.num_clients={k}", f"data.min_partition_size={per_client}",
        f"train.examples={per_client}", f"train.batch_size={MICRO_BATCH}", "train.grad_accum=1",
        "lora.ranks=[16]", f"lora.init={init!r}",
    ]  # fmt: skip
    return load_config(opts.config, [*opts.overrides, *keys])


def upload_dir(opts: SweepOptions, init: str, k: int, round: int, client: str) -> Path:
    return cell_dir(opts, init, k) / f"round-{round}" / client


def cell_dir(opts: SweepOptions, init: str, k: int) -> Path:
    """Both rounds' uploads of one (init, K), beside the config they were trained under."""
    return Path(opts.uploads) / f"{init}-k{k:02d}"


def train_clients(
    opts: SweepOptions, cfg: FloristConfig, init: str, round: int, merged: Mapping[str, LoraFactors] | None
) -> list[ClientUpdate]:
    """Every client's upload of ``round`` (from disk when already trained), one model in memory at a time.

    Before round 2 a client merges ``merged`` (round 1's global update) and starts a fresh LoRA, as a
    FLoRIST client does."""
    n = cfg.federation.num_clients
    for k in range(n):
        cid = client_id(k)
        path = upload_dir(opts, init, n, round, cid)
        if (path / "florist.json").exists():
            continue
        model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        client = client_from_config(cfg, k, model.to(cfg.model.torch_device()), tok,
                                    client_examples(cfg.data, k, n), ClientProtocol.MERGE_AND_RESTART,
                                    as_trained=True)  # fmt: skip
        if merged is not None:
            client.receive(merged, round=round - 1)
        start = time.perf_counter()
        _, stats = client.fit(round)
        meta = {"num_examples": client.num_examples, "steps": stats.steps, "tokens": stats.tokens,
                "train_loss": stats.loss, "seconds": time.perf_counter() - start}  # fmt: skip
        with atomic_dir(path, overwrite=True) as tmp:
            save_adapter_files(tmp, extract(client.model), base_model=cfg.model.name)
            write_json_atomic(tmp / "florist.json", meta)
        log.info("K=%d %s round %d: %s trained in %.0f s", n, init, round, cid, meta["seconds"])
    return load_uploads(cell_dir(opts, init, n) / f"round-{round}")


def load_uploads(folder: Path) -> list[ClientUpdate]:
    updates = []
    for path in sorted(folder.iterdir()):
        meta = json.loads((path / "florist.json").read_text())
        updates.append(read_adapter(path, path.name).to_update(path.name, float(meta["num_examples"])))
    return updates


def analyse(updates: list[ClientUpdate], taus: Sequence[float], round: int) -> dict[str, Any]:
    """Kept rank and bytes of every method on one round's uploads."""
    rows = {}
    for name, agg in methods(taus).items():
        result = agg.aggregate(updates, round=round)
        comm = communication(updates, result)
        rows[name] = {"rank_total": sum(result.ranks.values()), "bytes_up": comm.uplink_total,
                      "bytes_down": comm.downlink_total}  # fmt: skip
    return rows


def global_update(updates: list[ClientUpdate], tau: float) -> dict[str, LoraFactors]:
    result: AggregationResult = make_aggregator("florist", policy=EnergyThreshold(tau)).aggregate(updates)
    return result.global_update


def run(opts: SweepOptions) -> dict[str, Any]:
    """Every (init, K, round) not yet in ``results.json``; the results so far."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    meta = {
        "total_examples_per_round": opts.total_examples, "rank": 16, "micro_batch": MICRO_BATCH,
        "taus": list(opts.taus), "round_2_starts_from": f"FLoRIST tau={opts.global_tau:.2f}",
        "config": Path(opts.config).name, "overrides": list(opts.overrides),
        "training": fingerprint(sweep_config(opts, 8, "shared")),  # the settings every cell shares (at K = 8)
    }  # fmt: skip
    check_meta(path, results.get("meta"), meta)  # never mix two sweeps' cells
    results["meta"] = meta
    for init in opts.inits:
        for k in opts.counts:
            run_cell(opts, results, init, k)
            write_json_atomic(path, results)
    return results


def run_cell(opts: SweepOptions, results: dict[str, Any], init: str, k: int) -> None:
    """Both rounds of one (init, K); round 1's uploads come back from disk when round 2 is missing."""
    cells = results["cells"]
    if all(f"{init}/K={k}/round={r}" in cells for r in opts.rounds):
        return
    cfg = sweep_config(opts, k, init)
    folder = cell_dir(opts, init, k)
    claim(
        folder,
        fingerprint(cfg) | {"round_2_starts_from": opts.global_tau},
        f"remove {folder} or pass another --uploads",
    )
    merged = None
    for rnd in sorted(opts.rounds):
        updates = train_clients(opts, cfg, init, rnd, merged)
        cells[f"{init}/K={k}/round={rnd}"] = {
            "init": init, "clients": k, "round": rnd, "examples_per_client": cfg.train.examples,
            "num_examples": [u.num_examples for u in updates], "methods": analyse(updates, opts.taus, rnd),
        }  # fmt: skip
        merged = global_update(updates, opts.global_tau)
        log.info("%s/K=%d/round=%d done", init, k, rnd)


# ---------------------------------------------------------------------------- report


def markdown(results: Mapping[str, Any]) -> str:
    """One table per round: download (all clients, MB) and FLoRIST's kept rank against K."""
    cells = sorted(results["cells"].values(), key=lambda c: (c["round"], c["init"], c["clients"]))
    names = list(cells[0]["methods"]) if cells else []
    lines = []
    for rnd in sorted({c["round"] for c in cells}):
        lines += [f"\n### Round {rnd}: bytes down, all clients (MB); FLoRIST's kept rank in brackets\n",
                  "| init | K | examples / client | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]  # fmt: skip
        for c in (c for c in cells if c["round"] == rnd):
            row = [_cell(name, c["methods"][name]) for name in names]
            lines.append(
                f"| {c['init']} | {c['clients']} | {c['examples_per_client']} | " + " | ".join(row) + " |"
            )
    return "\n".join(lines) + "\n"


def _cell(name: str, m: Mapping[str, Any]) -> str:
    mb = f"{m['bytes_down'] / 1e6:.2f}"
    return f"{mb} ({m['rank_total']})" if name.startswith("FLoRIST") else mb


def plot_bytes(results: Mapping[str, Any], path: Path) -> None:
    """Download bytes (all clients) against K, one panel per round; FLoRA, FedIT, FLoRIST per tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from florist.fsutil import save_figure

    cells = list(results["cells"].values())
    rounds = sorted({c["round"] for c in cells})
    size = (5.5 * len(rounds) + 2.5, 4.2)  # room for the legend on the right
    fig, axes = plt.subplots(1, len(rounds), figsize=size, squeeze=False, sharey=True)
    for ax, rnd in zip(axes[0], rounds, strict=True):
        for init, style in (("shared", "-"), ("per_client", "--")):
            mine = sorted(
                (c for c in cells if c["round"] == rnd and c["init"] == init), key=lambda c: c["clients"]
            )
            if not mine:
                continue
            for i, name in enumerate(mine[0]["methods"]):  # a colour per method, a line style per init
                ys = [c["methods"][name]["bytes_down"] / 1e6 for c in mine]
                ax.plot([c["clients"] for c in mine], ys, style, color=f"C{i}", marker="o",
                        label=f"{name}, {init} init")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="clients K", title=f"round {rnd}")
        ax.set_xticks([c for c in sorted({c["clients"] for c in cells})])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # no 6x10^0 over the K ticks
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("bytes down per round, all clients (MB)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: no data hidden
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(opts: SweepOptions) -> str:
    """table.md and bytes_vs_clients.png from results.json; returns the table."""
    from florist.fsutil import write_text_atomic

    out = Path(opts.out)
    results = json.loads((out / "results.json").read_text())
    if not results.get("cells"):
        return "no cell finished yet"
    text = markdown(results)
    write_text_atomic(out / "table.md", text)
    plot_bytes(results, out / "bytes_vs_clients.png")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``florist client-sweep``."""
    study_arguments(p, "runs/client-sweep", "results.json, table.md, plot")
    p.add_argument(
        "--uploads", default="runs/client-sweep-uploads", help="where the clients' uploads are kept"
    )
    p.add_argument("--counts", type=ints, default=(4, 8, 16, 32), help="numbers of clients K")
    p.add_argument("--inits", default="shared,per_client", help="lora.init policies")
    p.add_argument("--total-examples", type=int, default=512, help="examples per round, all clients together")
    p.add_argument("--taus", type=floats, default=(0.95, 0.9, 0.8), help="FLoRIST taus")
    p.add_argument(
        "--report-only", action="store_true", help="redraw table.md and the plot from results.json"
    )


def main(args: argparse.Namespace) -> None:
    """``florist client-sweep``: the cells not yet in results.json (unless ``--report-only``); the table."""
    if args.total_examples < 1:
        raise ConfigError(f"--total-examples must be >= 1, got {args.total_examples}")
    if not args.counts or min(args.counts) < 1:
        raise ConfigError(f"--counts must be client counts >= 1, got {list(args.counts)}")
    opts = SweepOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out,
        uploads=args.uploads, counts=args.counts, total_examples=args.total_examples, taus=args.taus,
        inits=names(args.inits),
    )  # fmt: skip
    if not args.report_only:
        run(opts)
    print(write_report(opts))
