"""The regime study: when does FLoRIST save bytes over FedIT? Round 1 only, every method offline.

    florist regime [--out docs/results/regime] [--uploads runs/regime-uploads]
                   [--batches 4,32] [--examples 32,128,512] [--inits per_client,shared] [k=v ...]

A cell is (effective batch, examples per round, init policy). For each (batch, init) the 8 Dolly
clients train round 1 once from the base model for the largest examples-per-round, and their LoRA is
saved after each smaller budget on the way (the same run, stopped earlier, is exactly the smaller
cell: constant learning rate, same stream and seeds). The uploads are PEFT adapter dirs with a
``florist.json`` (``--uploads``; ``florist aggregate`` reproduces any row from them). Every method is
then aggregated offline from the same uploads (aggregation is nearly free), its global model merged
into the base and scored on the held-out rows:

    FLoRIST kept rank at each tau, bytes of FedIT / FLoRA / FLoRIST, the relative error of the round
    against the exact aggregate, and the paired held-out loss difference against the exact aggregate
    (FLoRA) with a 95 % interval clustered by row.

Every cell is written to ``results.json`` as soon as it is done and skipped on a rerun, and each
client's uploads are skipped when already on disk, so a killed study continues where it stopped.
Under ``per_client`` init FedIT's clients start from different A's, which is not FedAvg: florist's
own FedIT always starts from the shared draw; the row is there to show what that costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from florist.aggregation import communication, make_aggregator
from florist.aggregation.base import AggregationResult, ClientProtocol
from florist.aggregation.rank_policy import EnergyThreshold
from florist.cli_parsing import floats, ints, names, study_arguments
from florist.client.local import LocalClient, client_from_config, client_id
from florist.client.lora_state import extract
from florist.client.model import load_model
from florist.client.train import TrainStats
from florist.config import PAPER_CONFIG, FloristConfig, load_config
from florist.data.federated import client_examples, test_examples
from florist.errors import ConfigError
from florist.eval.heldout import LossResult, heldout_loss
from florist.eval.paired import paired_difference
from florist.fsutil import atomic_dir, write_json_atomic
from florist.lora import ClientUpdate
from florist.lora.peft_io import read_adapter, save_adapter_files
from florist.precision import resolve
from florist.server.global_model import GlobalModel
from florist.studies.provenance import check_meta, claim, fingerprint
from florist.studies.simulate import round_error

log = logging.getLogger(__name__)
TAUS = (0.99, 0.95, 0.9, 0.87, 0.8)
MICRO_BATCH = 4  # examples per forward pass; the effective batch is reached by accumulation


@dataclass(frozen=True)
class Cell:
    batch: int  # effective batch (examples per optimizer step)
    examples: int  # examples per client per round
    init: str  # lora.init

    @property
    def key(self) -> str:
        return f"batch{self.batch}-examples{self.examples}-{self.init}"

    @property
    def steps(self) -> int:
        return self.examples // self.batch


@dataclass(frozen=True)
class RegimeOptions:
    config: str = PAPER_CONFIG
    overrides: tuple[str, ...] = ()
    out: str = "docs/results/regime"
    uploads: str = "runs/regime-uploads"
    batches: tuple[int, ...] = (4, 32)
    examples: tuple[int, ...] = (32, 128, 512)
    inits: tuple[str, ...] = ("per_client", "shared")
    taus: tuple[float, ...] = TAUS


def study_config(opts: RegimeOptions, batch: int, examples: int, init: str) -> FloristConfig:
    """The bench config with this (batch, init) and a budget of ``examples`` examples per round."""
    cfg = load_config(opts.config, list(opts.overrides))
    if batch % MICRO_BATCH and batch > MICRO_BATCH:
        raise ConfigError(f"effective batch {batch} is not a multiple of the micro-batch {MICRO_BATCH}")
    micro = min(batch, MICRO_BATCH)
    train = replace(cfg.train, steps=None, epochs=None, examples=examples, batch_size=micro,
                    grad_accum=batch // micro)  # fmt: skip
    return replace(cfg, train=train, lora=replace(cfg.lora, init=init))


# ---------------------------------------------------------------------------- training and uploads


def upload_dir(opts: RegimeOptions, cell: Cell, client: str) -> Path:
    return Path(opts.uploads) / cell.key / client


def train_uploads(opts: RegimeOptions, batch: int, init: str) -> None:
    """Train each client once to the largest budget, saving its LoRA at every budget of the study."""
    cells = [Cell(batch, e, init) for e in sorted(opts.examples)]
    cfg = study_config(opts, batch, cells[-1].examples, init)
    n = cfg.federation.num_clients
    for c in cells:  # every budget is a snapshot of one training run at the largest
        folder = Path(opts.uploads) / c.key
        claim(folder, fingerprint(cfg), f"remove {folder} or pass another --uploads")
    for k in range(n):
        cid = client_id(k)
        todo = {c.steps: c for c in cells if not (upload_dir(opts, c, cid) / "florist.json").exists()}
        if not todo:
            continue
        model, tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        client = client_from_config(cfg, k, model.to(cfg.model.torch_device()), tok,
                                    client_examples(cfg.data, k, n), ClientProtocol.MERGE_AND_RESTART,
                                    as_trained=True)  # fmt: skip
        snapshots = Snapshots(opts, client, todo, cfg.model.name)
        client.fit(1, on_step=snapshots)
        log.info("%s batch %d %s: trained in %.0f s", cid, batch, init, time.perf_counter() - snapshots.start)


class Snapshots:
    """``on_step`` callback: after the step that ends a cell's budget, save the client's LoRA."""

    def __init__(self, opts: RegimeOptions, client: LocalClient, todo: dict[int, Cell], base: str) -> None:
        self.opts, self.client, self.todo, self.base = opts, client, todo, base
        self.start = time.perf_counter()

    def __call__(self, stats: TrainStats) -> None:
        cell = self.todo.get(stats.steps)
        if cell is None:
            return
        meta = {
            "num_examples": self.client.num_examples, "steps": stats.steps, "tokens": stats.tokens,
            "label_tokens": stats.label_tokens, "train_loss": sum(stats.losses) / len(stats.losses),
            "seconds": time.perf_counter() - self.start,
        }  # fmt: skip
        with atomic_dir(upload_dir(self.opts, cell, self.client.client_id), overwrite=True) as tmp:
            save_adapter_files(tmp, extract(self.client.model), base_model=self.base)
            write_json_atomic(tmp / "florist.json", meta)


def load_uploads(opts: RegimeOptions, cell: Cell) -> tuple[list[ClientUpdate], dict[str, dict[str, Any]]]:
    updates, info = [], {}
    for path in sorted(p for p in (Path(opts.uploads) / cell.key).iterdir() if p.is_dir()):  # not provenance
        meta = json.loads((path / "florist.json").read_text())
        updates.append(read_adapter(path, path.name).to_update(path.name, float(meta["num_examples"])))
        info[path.name] = meta
    return updates, info


# ---------------------------------------------------------------------------- offline aggregation


def methods(taus: Sequence[float]) -> dict[str, Any]:
    out = {"FedIT": make_aggregator("fedit"), "FLoRA": make_aggregator("flora")}
    for tau in taus:
        out[f"FLoRIST tau={tau:.2f}"] = make_aggregator("florist", policy=EnergyThreshold(tau))
    return out


class Scorer:
    """The base model, loaded once; each global update is set on top of it and scored."""

    def __init__(self, cfg: FloristConfig) -> None:
        model, self.tok = load_model(cfg.model.name, cfg.model.torch_dtype())
        self.model = GlobalModel(model.to(cfg.model.torch_device()), self.tok, ClientProtocol.CONTINUE_GLOBAL)
        self.test = test_examples(cfg.data)
        self.eval = cfg.eval
        self.precision = resolve(cfg.eval.precision, cfg.model.torch_device())

    def loss(self, result: AggregationResult | None) -> LossResult:
        if result is not None:
            self.model.apply(1, result.global_update)  # W = W0 + B_g A_g (the base restored first)
        with self.precision.autocast():
            return heldout_loss(self.model.model, self.tok, self.test, self.eval.max_length,
                                self.eval.batch_size, progress=False)  # fmt: skip


def analyse(cell: Cell, updates: list[ClientUpdate], scorer: Scorer, base: LossResult,
            taus: Sequence[float]) -> dict[str, Any]:  # fmt: skip
    rows: dict[str, Any] = {}
    losses: dict[str, LossResult] = {}
    for name, agg in methods(taus).items():
        result = agg.aggregate(updates, round=1)
        comm = communication(updates, result)
        losses[name] = scorer.loss(result)
        rows[name] = {
            "rank_total": sum(result.ranks.values()),
            "rank_mean": sum(result.ranks.values()) / len(result.ranks),
            "bytes_up": comm.uplink_total,
            "bytes_down": comm.downlink_total,
            "rel_error_vs_exact": round_error(result, updates, None),
            "heldout_loss": losses[name].loss,
            "per_example_loss": losses[name].to_dict()["per_example"],
        }
    for name in rows:
        rows[name]["paired_vs_flora"] = paired_difference(losses["FLoRA"], losses[name]).to_dict()
        rows[name]["paired_vs_base"] = paired_difference(base, losses[name]).to_dict()
    return rows


# ---------------------------------------------------------------------------- the study


def run(opts: RegimeOptions) -> dict[str, Any]:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    cfg = study_config(opts, opts.batches[0], opts.examples[0], opts.inits[0])
    check_meta(path, results.get("regime"), regime_description(cfg))  # never mix two studies' cells
    scorer: Scorer | None = None
    pairs = [(b, i) for i in opts.inits for b in opts.batches]
    for batch, init in tqdm(pairs, desc="regime (batch, init)"):
        cells = [Cell(batch, e, init) for e in sorted(opts.examples)]
        if all(c.key in results["cells"] for c in cells):
            continue
        train_uploads(opts, batch, init)
        scorer = scorer or Scorer(cfg)
        if "base" not in results:
            results["base"] = scorer.loss(None).to_dict()
            results["regime"] = regime_description(cfg)
        base = loss_from_dict(results["base"])
        for cell in cells:
            if cell.key in results["cells"]:
                continue
            updates, info = load_uploads(opts, cell)
            results["cells"][cell.key] = {
                "batch": cell.batch, "examples": cell.examples, "init": cell.init, "steps": cell.steps,
                "clients": info, "methods": analyse(cell, updates, scorer, base, opts.taus),
            }  # fmt: skip
            write_json_atomic(path, results)
            log.info("cell %s done", cell.key)
    return results


def write_report(opts: RegimeOptions) -> str:
    """table.md and kept_rank.png from results.json; returns the table."""
    from florist.fsutil import write_text_atomic
    from florist.studies import regime_report

    out = Path(opts.out)
    results = json.loads((out / "results.json").read_text())
    if not results.get("cells"):
        return "no cell finished yet"
    text = regime_report.markdown(results)
    write_text_atomic(out / "table.md", text)
    regime_report.plot_kept_rank(results, out / "kept_rank.png")
    return text


def loss_from_dict(d: dict[str, Any]) -> LossResult:
    per = [float("nan") if x is None else x for x in d["per_example"]]
    return LossResult(d["loss"], d["perplexity"], d["n_tokens"], per, d["per_example_tokens"])


def regime_description(cfg: FloristConfig) -> dict[str, Any]:
    lora, train, ev = cfg.lora, cfg.train, cfg.eval
    return {
        "model": cfg.model.name,
        "data": cfg.data.source,
        "clients": cfg.federation.num_clients,
        "lora": {"ranks": list(lora.ranks), "alpha": lora.alpha, "targets": list(lora.target_modules)},
        "train": {"lr": train.lr, "micro_batch": MICRO_BATCH, "max_length": train.max_length,
                  "train_on_inputs": train.train_on_inputs, "precision": train.precision},
        "eval": {"rows": "all of data.test", "max_length": ev.max_length, "precision": ev.precision},
        "seed": cfg.federation.seed,
    }  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``florist regime``."""
    study_arguments(p, "runs/regime", "results.json, table.md, plot")
    p.add_argument("--uploads", default="runs/regime-uploads", help="where the clients' uploads are kept")
    p.add_argument("--batches", type=ints, default=(4, 32), help="effective batch sizes")
    p.add_argument("--examples", type=ints, default=(32, 128, 512), help="examples per client per round")
    p.add_argument("--inits", default="per_client,shared", help="lora.init policies")
    p.add_argument("--taus", type=floats, default=None, help="FLoRIST taus (default 0.99,0.95,0.9,0.87,0.8)")
    p.add_argument(
        "--report-only", action="store_true", help="redraw table.md and the plot from results.json"
    )


def main(args: argparse.Namespace) -> None:
    """``florist regime``: run the cells not yet in results.json (unless ``--report-only``); the table."""
    opts = RegimeOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out,
        uploads=args.uploads, batches=args.batches, examples=args.examples,
        inits=names(args.inits), taus=args.taus or TAUS,
    )  # fmt: skip
    if not args.report_only:
        run(opts)
    print(write_report(opts))
