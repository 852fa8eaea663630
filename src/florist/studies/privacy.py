"""The privacy-utility study: final held-out loss against epsilon per method, in both privacy modes, with
a membership-inference check.

    florist privacy-study [--out docs/results/privacy] [--cache runs/privacy-cache]
                          [--epsilons 1,3,8,inf] [--modes dp-sgd,client] [--rounds 3] [k=v ...]

Cells are (mode, method, epsilon); epsilon = inf is the same method without DP, in the same regime
(the reference each row is paired against):

    dp-sgd   the paper's 8 Dolly clients (paper_cpu.toml), DP-SGD on every client at delta 1e-5;
             FedIT, FFA-LoRA, FedSVD, FLoRA, FLoRIST tau = 0.9 (every method keeps sample-level DP)
    client   the Dolly pool re-split over ``--clients`` (100) by category, ``--fraction`` (0.1)
             sampled per round, client-level DP at delta 1e-3; FedIT, FFA-LoRA, FedSVD, Fed-SB (its
             round 0 one more release, with every client), FLoRA, FLoRIST tau = 0.9 and FLoRIST with
             the noise rule (``aggregation.rank_policy = "noise"``); DP-SGD does not cover Fed-SB, whose
             round 0 sends raw gradients

Every cell trains ``--rounds`` rounds with warm start off and the bf16 wire, scored on the test rows
after the last; its final global model is attacked (``florist.eval.membership``): client 0's first
training rows (as many as the test rows) against the test rows. Each finished cell is kept in
``results.json`` and every finished round checkpointed under ``--cache``, so the same command
continues a killed study. ``table.md`` and ``loss_vs_epsilon.png`` are rewritten from the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from florist.cli_parsing import names, study_arguments
from florist.config import PAPER_CONFIG, FloristConfig, load_config
from florist.data.federated import client_examples, client_left_out
from florist.data.records import Example
from florist.errors import ConfigError
from florist.eval.membership import calibrated, loss_threshold_attack
from florist.eval.paired import paired_difference
from florist.fsutil import file_lock, save_figure, update_json_atomic, write_text_atomic
from florist.server.evaluation import Evaluator
from florist.studies.fair import split_loss
from florist.studies.headline import split_evaluator
from florist.studies.report import total_bytes

log = logging.getLogger(__name__)
METHODS = {  # mode -> (label, config keys)
    "dp-sgd": (
        ("FedIT", ("aggregation.method='fedit'", "aggregation.tau=none")),
        ("FFA-LoRA", ("aggregation.method='ffa'", "aggregation.tau=none")),
        ("FedSVD", ("aggregation.method='fedsvd'", "aggregation.tau=none")),
        ("FLoRA", ("aggregation.method='flora'", "aggregation.tau=none")),
        ("FLoRIST tau=0.90", ("aggregation.method='florist'", "aggregation.tau=0.9")),
    ),
    "client": (
        ("FedIT", ("aggregation.method='fedit'", "aggregation.tau=none")),
        ("FFA-LoRA", ("aggregation.method='ffa'", "aggregation.tau=none")),
        ("FedSVD", ("aggregation.method='fedsvd'", "aggregation.tau=none")),
        ("Fed-SB", ("aggregation.method='fedsb'", "aggregation.tau=none")),
        ("FLoRA", ("aggregation.method='flora'", "aggregation.tau=none")),
        ("FLoRIST tau=0.90", ("aggregation.method='florist'", "aggregation.tau=0.9")),
        ("FLoRIST noise rule", ("aggregation.method='florist'", "aggregation.tau=none",
                                "aggregation.rank_policy='noise'")),
    ),
    "attack": (
        ("FedIT", ("aggregation.method='fedit'", "aggregation.tau=none")),
        ("FLoRIST tau=0.90", ("aggregation.method='florist'", "aggregation.tau=0.9")),
    ),
}  # fmt: skip
MODES = tuple(METHODS)
# a method whose run without DP is another's: the noise rule needs a noise level, so without DP
# FLoRIST keeps its tau (one cell, not two of the same config)
NO_DP_TWIN = {"FLoRIST noise rule": "FLoRIST tau=0.90"}
DELTA = {"dp-sgd": 1e-5, "client": 1e-3, "attack": 1e-5}


@dataclass(frozen=True)
class StudyOptions:
    config: str = PAPER_CONFIG
    overrides: tuple[str, ...] = ()
    out: str = "docs/results/privacy"
    cache: str = "runs/privacy-cache"
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0, math.inf)
    modes: tuple[str, ...] = MODES
    rounds: int = 3
    clients: int = 100  # client mode's federation
    fraction: float = 0.1
    clip: float = 0.5  # client mode's bound on a client's change (C)
    max_grad_norm: float = 1.0  # dp-sgd's bound on an example's gradient
    attack_rows: int = 32  # attack mode: every client's rows (its members), trained 6 epochs


def cell_key(mode: str, label: str, epsilon: float) -> str:
    return f"{mode} / {label} / eps={'inf' if math.isinf(epsilon) else f'{epsilon:g}'}"


def cell_config(opts: StudyOptions, mode: str, keys: Sequence[str], epsilon: float) -> FloristConfig:
    """The cell's config: the regime, the method's keys and the privacy keys (none at epsilon = inf)."""
    regime = [f"federation.rounds={opts.rounds}", "lora.warm_start=false", "federation.wire_dtype='bfloat16'",
              "aggregation.rank_policy='auto'"]  # fmt: skip
    if mode == "client":
        regime += ["data.split='dirichlet'", f"federation.num_clients={opts.clients}",
                   f"federation.fraction={opts.fraction}", "data.min_partition_size=8"]  # fmt: skip
    if mode == "attack":  # few rows, many epochs: the regime in which training leaks membership
        rows = opts.attack_rows
        regime += [f"data.max_examples_per_client={rows}", f"train.examples={2 * rows}", "train.steps=none",
                   "train.epochs=none"]  # fmt: skip
    privacy: list[str] = []
    if not math.isinf(epsilon):
        dp_mode = "dp-sgd" if mode == "attack" else mode
        privacy = [f"privacy.mode={dp_mode!r}", f"privacy.target_epsilon={epsilon}",
                   f"privacy.delta={DELTA[mode]}", f"privacy.clip={opts.clip}",
                   f"privacy.max_grad_norm={opts.max_grad_norm}"]  # fmt: skip
    return load_config(opts.config, [*opts.overrides, *regime, *keys, *privacy])


def attack_rows(cfg: FloristConfig) -> tuple[list[Example], list[Example]]:
    """The attack's rows, one distribution: client 0's training rows (members: every row it holds, in
    its training set every round; under DP-SGD each is drawn with probability q per step) and as many
    rows of its own part that ``max_examples_per_client`` left out (non-members: no client ever held
    them), a seeded draw."""
    members = client_examples(cfg.data, 0, cfg.federation.num_clients)
    left = client_left_out(cfg.data, 0, cfg.federation.num_clients)
    if len(left) < len(members):
        raise ConfigError(
            f"the membership attack needs client 0 to have {len(members)} rows beyond the "
            f"{len(members)} it trains on (--attack-rows), but it has {len(left)}"
        )
    chosen = sorted(random.Random(f"{cfg.data.seed}:attack").sample(range(len(left)), len(members)))
    return members, [left[i] for i in chosen]


def attack(cfg: FloristConfig, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Per-row losses of the attack's members and non-members (``attack_rows``) under ``model`` and
    under the public base model (the reference-model attack's calibration)."""
    from florist.client.model import load_client_model

    members, non_members = attack_rows(cfg)
    base, base_tok = load_client_model(cfg)
    out = {"member_rows": row_losses(cfg, members, model, tokenizer),
           "non_member_rows": row_losses(cfg, non_members, model, tokenizer),
           "member_base_rows": row_losses(cfg, members, base, base_tok),
           "non_member_base_rows": row_losses(cfg, non_members, base, base_tok)}  # fmt: skip
    del base
    return out


def row_losses(cfg: FloristConfig, rows: list[Example], model: Any, tokenizer: Any) -> list[float]:
    """Each row's mean token loss under ``model``, scored as held-out rows are (nan: no label token)."""
    ev = replace(cfg.eval, mmlu=None, exact_match=False, subset=None)
    return list(Evaluator(ev, rows, cfg.data.seed, False, rows=True)(model, tokenizer)["heldout_rows"])


def cell_folder(opts: StudyOptions, key: str) -> Path:
    """The cell's checkpoint folder under ``--cache``."""
    return Path(opts.cache) / key.replace(" / ", "__").replace("=", "-").replace(" ", "_")


def run_cell(
    opts: StudyOptions, mode: str, key: str, keys: Sequence[str], eps: float
) -> list[dict[str, Any]]:
    """One cell's rounds (checkpointed under ``--cache``), scored and attacked after the last."""
    from florist.studies.simulate import run_variant

    cfg = cell_config(opts, mode, keys, eps)
    if mode == "attack":
        attack_rows(cfg)  # a client 0 too small for the attack fails now, not after the training
    evaluate = split_evaluator(cfg)

    def score(model: Any, tokenizer: Any) -> dict[str, Any]:
        scores = evaluate(model, tokenizer)
        return scores | ({"attack": attack(cfg, model, tokenizer)} if mode == "attack" else {})

    # one client model in memory at a time (a DP-SGD cell of 8 held 10 GB): two cells fit side by side
    records = run_variant(
        cfg, score, eval_rounds=[opts.rounds], checkpoint=cell_folder(opts, key), live_clients=0
    )
    acc = cfg.accountant()
    target = None if math.isinf(eps) else eps
    # client mode: the server's noise multiplier; dp-sgd: each client plans its own (the worst's epsilon)
    spent = acc.epsilon(opts.rounds) if acc else records[-1].get("epsilon_max")
    records[-1]["privacy"] = {"mode": mode, "target_epsilon": target, "epsilon": spent,
                              "sigma": acc.sigma if acc else None}  # fmt: skip
    return records


BASE = "base model"  # each mode's reference row: the untrained model on the mode's test rows


def base_cell(opts: StudyOptions, mode: str) -> list[dict[str, Any]]:
    """The base model scored as the cells are (and attacked in ``attack`` mode), nothing trained."""
    from florist.client.model import load_client_model

    cfg = cell_config(opts, mode, METHODS[mode][0][1], math.inf)
    model, tokenizer = load_client_model(cfg)
    scores = split_evaluator(cfg)(model, tokenizer)
    if mode == "attack":
        scores["attack"] = attack(cfg, model, tokenizer)
    return [{"round": 0, "eval": scores, "privacy": {"mode": mode, "target_epsilon": None, "epsilon": None,
                                                     "sigma": None}}]  # fmt: skip


def run(opts: StudyOptions) -> dict[str, Any]:
    """Every cell not yet in ``results.json``, one after another (resumable per cell and round).

    A cell is claimed with a lock in its cache folder and each finished cell is merged into
    ``results.json`` under a lock, so the same command started twice (two cores) shares the work:
    each process skips the cells the other holds or has finished."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"

    def finished() -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}

    def claim(key: str, work: Callable[[], list[dict[str, Any]]]) -> bool:
        """Run the cell unless it is finished or another process holds it; whether it ran."""
        if key in finished():
            return False
        with file_lock(cell_folder(opts, key) / ".claim", wait=False) as mine:
            if not mine or key in finished():  # another process runs it, or just finished it
                return False
            log.info("privacy study: %s", key)
            update_json_atomic(path, key, work())
            return True

    cells: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = []
    for mode in opts.modes:  # every method at one epsilon before the next: a partial study compares
        cells.append((cell_key(mode, BASE, math.inf), partial(base_cell, opts, mode)))
        for eps in opts.epsilons:
            for label, keys in METHODS[mode]:
                if math.isinf(eps) and label in NO_DP_TWIN:
                    continue
                key = cell_key(mode, label, eps)
                cells.append((key, partial(run_cell, opts, mode, key, keys, eps)))
    # again until a pass runs nothing: a cell skipped because another process held it is taken up
    # here if that process died before finishing it
    while any([claim(key, work) for key, work in cells]):
        pass
    results = finished()
    write_report(out, results)
    return results


def write_report(out: Path, results: Mapping[str, Any]) -> None:
    """``table.md``: per cell the final test loss, its paired difference against the same method
    without DP, epsilon spent and bytes; then the membership attack's cells (``attack`` mode): its AUC
    on raw losses and calibrated by the base model, with 95 % intervals; ``loss_vs_epsilon.png``."""
    lines = ["| mode | method | epsilon | epsilon spent | test loss | vs no DP | vs base model | MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    attacks = ["", "Membership attack (`attack` mode): client 0's training rows against rows of its own "
               "part that no client held; AUC with 95 % interval (Hanley & McNeil), 0.5 = no leak.", "",
               "| method | epsilon | test loss | AUC, raw losses | AUC, calibrated by the base model | "
               "calibrated advantage | mean loss drop, members / non-members |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in sorted(results, key=order):
        records = results[key]
        mode, label, eps = key.split(" / ")
        last = records[-1]
        loss = split_loss(last, "test")
        no_dp = cell_key(mode, NO_DP_TWIN.get(label, label), math.inf)
        ref = results.get(no_dp)
        versus = ""
        if ref is not None and loss is not None and (base := split_loss(ref[-1], "test")) is not None:
            versus = paired_difference(base, loss).describe() if key != no_dp else "-"
        untrained = results.get(cell_key(mode, BASE, math.inf))
        learned = ""
        start = split_loss(untrained[-1], "test") if untrained is not None and label != BASE else None
        if start is not None and loss is not None:
            learned = paired_difference(start, loss).describe()
        mb = total_bytes(records) / 1e6
        value = f"{loss.loss:.4f}" if loss else ""
        e = eps.removeprefix("eps=")
        spent = (last.get("privacy") or {}).get("epsilon")
        spent_text = "-" if spent is None else f"{spent:.2f}"
        lines.append(f"| {mode} | {label} | {e} | {spent_text} | {value} | {versus} | {learned} | {mb:.1f} |")
        if (rows := last.get("eval", {}).get("attack")) is not None:
            raw = loss_threshold_attack(rows["member_rows"], rows["non_member_rows"])
            member, non_member = (
                calibrated(rows[f"{w}_rows"], rows[f"{w}_base_rows"]) for w in ("member", "non_member")
            )
            cal = loss_threshold_attack(member, non_member)
            drops = [mean_seen(member), mean_seen(non_member)]
            attacks.append(f"| {label} | {e} | {value} | {raw.describe()} | {cal.describe()} | "
                           f"{cal.advantage:.3f} | {drops[0]:+.4f} / {drops[1]:+.4f} |")  # fmt: skip
    if len(attacks) == 5:
        attacks = []
    write_text_atomic(out / "table.md", "\n".join(pivots(results) + lines + attacks) + "\n")
    _plot(out, results)


def order(key: str) -> tuple[int, int, float]:
    """A cell's place in the tables: by mode (``MODES``), method (``METHODS``, the base model last),
    then epsilon from inf (no DP) down."""
    mode, label, eps = key.split(" / ")
    labels = [name for name, _ in METHODS.get(mode, ())]
    place = len(labels) if label == BASE else labels.index(label) if label in labels else len(labels) + 1
    return MODES.index(mode) if mode in MODES else len(MODES), place, -float(eps.removeprefix("eps="))


def pivots(results: Mapping[str, Any]) -> list[str]:
    """Per utility mode, final test loss with one column per epsilon (inf: no DP; the noise rule's
    is FLoRIST tau 0.9's, ``NO_DP_TWIN``), then the full table's rows."""
    lines: list[str] = []
    for mode in (m for m in MODES if m != "attack"):
        cells = {tuple(k.split(" / ")[1:]): v for k, v in results.items() if k.startswith(f"{mode} / ")}
        if not cells:
            continue
        eps = sorted({e for _, e in cells}, key=lambda e: -float(e.removeprefix("eps=")))
        head = " | ".join("no DP" if e == "eps=inf" else e.replace("eps=", "ε = ") for e in eps)
        lines += [f"Final test loss, `{mode}` mode:", "", f"| method | {head} |",
                  "|---|" + "---|" * len(eps)]  # fmt: skip
        for label in [name for name, _ in METHODS[mode]] + [BASE]:
            row = []
            for e in eps:
                records = cells.get((label, e)) or (cells.get((NO_DP_TWIN[label], e)) if e == "eps=inf"
                                                     and label in NO_DP_TWIN else None)  # fmt: skip
                loss = split_loss(records[-1], "test") if records else None
                row.append(f"{loss.loss:.4f}" if loss is not None else "")
            if any(row):
                lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return [*lines, "Every cell:", ""] if lines else []


def mean_seen(values: Sequence[float]) -> float:
    """The mean of the values that are not nan (a row without a label token scores nan)."""
    seen = [v for v in values if not math.isnan(v)]
    return sum(seen) / len(seen) if seen else math.nan


def _plot(out: Path, results: Mapping[str, Any]) -> None:
    """``loss_vs_epsilon.png``: per utility mode, final test loss less the untrained model's (top,
    symlog: 0.01 nats and 8 nats both readable) and total bytes (bottom) against epsilon, one line
    per method in one colour across the panels; its run without DP dotted, the untrained model
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # a column per utility mode with a method scored under DP (without DP alone there is no curve)
    under_dp = [k.split(" / ") for k in results if not k.endswith("eps=inf")]
    modes = sorted({mode for mode, label, _ in under_dp if label != BASE} - {"attack"})
    if not modes:
        return
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7.5), squeeze=False)
    for col, mode in enumerate(modes):
        base_cell_ = results.get(cell_key(mode, BASE, math.inf))
        base = _final_test(base_cell_) if base_cell_ is not None else None

        def loss(records: Any, base: float | None = base) -> float | None:
            final = _final_test(records)
            return None if final is None else final - (base or 0.0)

        metrics: tuple[tuple[str, Callable[[Any], float | None]], ...] = (
            ("test loss less the untrained model's (nats)" if base is not None else "test loss (nats)", loss),
            ("total MB, up + down, all clients", lambda records: total_bytes(records) / 1e6),
        )
        for row, (ylabel, value) in enumerate(metrics):
            ax = axes[row][col]
            series: dict[str, list[tuple[float, float]]] = {}
            for key, records in results.items():
                m, label, eps = key.split(" / ")
                y = value(records)
                if m == mode and y is not None and (row == 0 or label != BASE):
                    series.setdefault(label, []).append((float(eps.removeprefix("eps=")), y))
            _panel(ax, series)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title("DP-SGD (sample-level)" if mode == "dp-sgd" else "client-level DP")
                if base is not None:
                    ax.set_yscale("symlog", linthresh=0.05, linscale=2.0)
                    low, high = ax.get_ylim()
                    marks = [s * v for v in (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30) for s in (-1, 1)] + [0.0]
                    shown = sorted(v for v in marks if low <= v <= high)
                    ax.set_yticks(shown, [f"{v:+g}" for v in shown])
            else:
                ax.set_yscale("log")
                low, high = ax.get_ylim()
                nice = [m * 10**k for k in range(-1, 6) for m in (1, 2, 3, 5)]
                shown = [v for v in nice if low <= v <= high]
                ax.set_yticks(shown, [f"{v:g}" for v in shown])
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlabel("epsilon (dotted: the method without DP)")
    legend: dict[str, Any] = {}  # one legend for the figure, below it: every method once
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, out / "loss_vs_epsilon.png", dpi=120)
    plt.close(fig)


def _final_test(records: Sequence[Mapping[str, Any]]) -> float | None:
    final = split_loss(records[-1], "test")
    return None if final is None else final.loss


# one colour per method in every panel
COLOURS = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(n for m in MODES for n, _ in METHODS[m]))}


def _panel(ax: Any, series: Mapping[str, list[tuple[float, float]]]) -> None:
    """One method per line against epsilon (log); its point at epsilon = inf as a dotted line of its
    colour, the base model's as a dashed black one."""
    for label, points in sorted(series.items()):
        if label == BASE:
            ax.axhline(
                points[0][1], color="black", linestyle="--", linewidth=1, label="base model (untrained)"
            )
            continue
        finite = sorted(p for p in points if not math.isinf(p[0]))
        colour = COLOURS.get(label)
        ax.plot([p[0] for p in finite], [p[1] for p in finite], marker="o", label=label, color=colour)
        for e, y in points:
            if math.isinf(e):
                ax.axhline(y, linestyle=":", linewidth=1, color=colour)
    ax.set_xscale("log")
    ticks = sorted({e for points in series.values() for e, _ in points if not math.isinf(e)}) or [1.0]
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.minorticks_off()


def epsilons(text: str) -> tuple[float, ...]:
    """``--epsilons 1,3,8,inf``: privacy targets > 0; inf runs without DP."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated epsilons (or inf), got {text!r}") from err
    if not values or not all(v > 0 and not math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be > 0 (inf: no DP), got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``florist privacy-study``."""
    study_arguments(p, "docs/results/privacy", "results.json, table.md, plot")
    p.add_argument("--cache", default="runs/privacy-cache", help="per-round checkpoints of unfinished cells")
    p.add_argument("--epsilons", type=epsilons, default=(1.0, 3.0, 8.0, math.inf), help="targets; inf: no DP")
    p.add_argument("--modes", default=",".join(MODES), help="dp-sgd, client, attack (the membership attack)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per cell")
    p.add_argument("--clients", type=int, default=100, help="client mode: clients re-split from the pool")
    p.add_argument("--fraction", type=float, default=0.1, help="client mode: clients sampled per round")
    p.add_argument("--attack-rows", type=int, default=32, help="attack mode: rows each client holds")
    p.add_argument(
        "--report-only", action="store_true", help="redraw table.md and the plot from results.json"
    )


def main(args: argparse.Namespace) -> None:
    """``florist privacy-study``: the cells not yet in results.json (unless ``--report-only``); the table."""
    modes = names(args.modes)
    if not modes or set(modes) - set(MODES):
        raise ConfigError(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    if args.rounds < 1 or args.clients < 2 or not 0 < args.fraction <= 1 or args.attack_rows < 1:
        raise ConfigError(
            "--rounds must be >= 1, --clients >= 2, --fraction in (0, 1] and --attack-rows >= 1"
        )
    opts = StudyOptions(
        config=args.config or PAPER_CONFIG, overrides=tuple(args.overrides), out=args.out, cache=args.cache,
        epsilons=args.epsilons, modes=modes, rounds=args.rounds, clients=args.clients, fraction=args.fraction,
        attack_rows=args.attack_rows,
    )  # fmt: skip
    if args.report_only:
        path = Path(opts.out) / "results.json"
        write_report(Path(opts.out), json.loads(path.read_text()) if path.is_file() else {})
    else:
        run(opts)
    print((Path(opts.out) / "table.md").read_text())
