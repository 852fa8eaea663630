"""The fair headline: each method at its best configuration, chosen on validation, over seeds.

    florist bench --seeds 0,1,2 --eval-every-round ... data.validation_per_label=10

reads ``OUT/seed-N/results.json`` (one ``florist bench`` per training seed, every variant scored after
every round on the validation and the test split) and writes ``OUT/fair.md``, ``OUT/fair.json`` and
one curves plot per rank setting (``OUT/curves_<setting>.png``).

- **Families.** A variant's family is its method (``FLoRIST tau=0.90 +all`` -> FLoRIST, ``FLoRA +bf16
  +orth`` -> FLoRA). Within a family the configuration with the lowest final *validation* loss on
  the first seed (the one every candidate ran) is that method "at its best", except that among the
  configurations within ``TIE`` nats of that loss the one with the fewest bytes is taken; the other
  seeds rerun that choice (``chosen``), and the table reports its means over them.
- **The best baseline** is the non-FLoRIST family choice with the lowest mean validation loss.
- **Test** rows are read only for the chosen configurations' table and curves.
- **Intervals** are paired on the same test rows and averaged over seeds (``paired_over_seeds``:
  the seed-to-seed spread plus the rows' spread).
- **Goal**: FLoRIST's choice no worse than the best baseline (upper end <= +0.001 nats), at least
  5x fewer total bytes than it and 20x fewer than FLoRA's choice, and its test curve at or below
  every chosen baseline's at every byte budget from round 3 on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from florist.eval.heldout import LossResult
from florist.eval.paired import PairedDifference, paired_over_seeds
from florist.fsutil import write_json_atomic, write_text_atomic
from florist.studies.report import BASE, loss_of, total_bytes

OURS = "FLoRIST"
SEED_DIR = re.compile(r"seed-(\d+)$")
TOLERANCE, VS_BEST, VS_FLORA = 0.001, 5.0, 20.0
TIE = 0.0005  # nats of validation loss within which a method's cheaper configuration is its best
# From FlexLoRA to FLoRIST one difference at a time: (variant, the rung it is paired against, what changes)
LADDER = (
    ("FLoRA +bf16 +orth +acc", "FlexLoRA +bf16",
     "merge the exact aggregate and warm-start from the accumulated update's leading r directions, instead "
     "of continuing from them and dropping the rest (the two differ only in that rest at equal ranks)"),
    ("FLoRA +bf16 +orth", "FLoRA +bf16 +orth +acc",
     "warm-start from the last round's update instead of the accumulated one"),
    ("FLoRIST tau=0.90 +bf16 +orth", "FLoRA +bf16 +orth",
     "keep 90 % of the aggregate's energy (the stack's SVD truncated) instead of all of it"),
    ("FLoRIST tau=0.90 +bf16 +orth +acc", "FLoRIST tau=0.90 +bf16 +orth",
     "at tau 0.9, the accumulated update as the warm source"),
    ("FLoRIST tau=0.90 +all +orth", "FLoRIST tau=0.90 +bf16 +orth",
     "uplink thresholding at tau 0.9 of each client's whole adapter"),
    ("FLoRIST tau=0.90 +all +orth +chg", "FLoRIST tau=0.90 +all +orth",
     "uplink thresholding of the round's change instead of the whole adapter"),
    ("FLoRIST tau=0.90 +all +orth +ef", "FLoRIST tau=0.90 +all +orth",
     "error feedback: the server adds what the cut left out to the next round's aggregate"),
    ("FLoRIST tau=0.90 +all +orth +acc +ef", "FLoRIST tau=0.90 +all +orth +ef",
     "with error feedback, the accumulated update as the warm source"),
    ("FLoRIST tau=0.90 +all +orth +acc +efr", "FLoRIST tau=0.90 +all +orth +acc +ef",
     "error feedback at the rank this round's aggregate needs, not tau of the carried aggregate's energy"),
)  # fmt: skip


def family(variant: str) -> str:
    """The method a variant name belongs to: its words before the first option or tau."""
    return re.split(r" \+| tau=| budget=", variant, maxsplit=1)[0]


def read_seeds(out: Path) -> dict[int, dict[str, Any]]:
    """``{seed: results.json}`` of every ``OUT/seed-N`` that has one."""
    found = {}
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        m = SEED_DIR.match(d.name)
        if m and (d / "results.json").is_file():
            found[int(m.group(1))] = json.loads((d / "results.json").read_text())
    return found


def split_loss(record: Mapping[str, Any], split: str) -> LossResult | None:
    """The record's held-out loss on ``split`` ("test" or "validation"), None if not scored."""
    ev = record.get("eval")
    if ev is None:
        return None
    return loss_of(ev) if split == "test" else loss_of(ev["validation"]) if "validation" in ev else None


def finished(per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int) -> dict[str, list[int]]:
    """Variant -> the seeds in which it finished ``rounds`` rounds."""
    out: dict[str, list[int]] = {}
    for seed, results in per_seed.items():
        for name, records in results.get(setting, {}).items():
            if name != BASE and len(records) == rounds and split_loss(records[-1], "test") is not None:
                out.setdefault(name, []).append(seed)
    return out


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def points(
    per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int
) -> dict[str, tuple[float, float]]:
    """Every finished variant's (mean final validation loss, mean total bytes) over the seeds it
    finished; a variant without validation rows is left out."""
    out: dict[str, tuple[float, float]] = {}
    for name, seeds in finished(per_seed, setting, rounds).items():
        losses = [split_loss(per_seed[s][setting][name][-1], "validation") for s in seeds]
        if all(loss is not None for loss in losses):
            spent = mean([total_bytes(per_seed[s][setting][name]) for s in seeds])
            out[name] = (mean([loss.loss for loss in losses if loss is not None]), spent)
    return out


def choose(
    per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int
) -> tuple[dict[str, str], dict[str, float]]:
    """Per family, the variant with the lowest mean final validation loss (within ``TIE`` of it:
    the fewest bytes); and every variant's mean validation loss."""
    point = points(per_seed, setting, rounds)
    best: dict[str, str] = {}
    for fam in sorted({family(n) for n in point}):
        members = [n for n in point if family(n) == fam]
        lowest = min(point[n][0] for n in members)
        near = [n for n in members if point[n][0] <= lowest + TIE]
        best[fam] = min(near, key=lambda n: (point[n][1], point[n][0]))
    return best, {n: loss for n, (loss, _) in point.items()}


def chosen(per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int) -> dict[str, str]:
    """Per family, the configuration chosen on validation: ``choose`` on the first seed alone (the
    seed every candidate ran). Later seeds rerun these choices and never re-decide them, so a chosen
    configuration's three seeds are not weighed against another's one."""
    first = min(per_seed, default=None)
    return choose({first: per_seed[first]}, setting, rounds)[0] if first is not None else {}


def frontier(per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int) -> list[str]:
    """Every finished variant that no other variant of its method dominates: none has a final
    validation loss and total bytes both at or below its own, one of them strictly (means over the
    seeds each finished). These are the configurations a method could still choose in another
    setting, whether it weighs loss or bytes."""
    point = points(per_seed, setting, rounds)

    def dominated(v: str) -> bool:
        return any(
            family(u) == family(v) and u != v and point[u][0] <= point[v][0] and point[u][1] <= point[v][1]
            and point[u] != point[v]
            for u in point
        )  # fmt: skip

    return sorted(v for v in point if not dominated(v))


def paired(
    per_seed: Mapping[int, Mapping[str, Any]],
    setting: str,
    a: str,
    b: str,
    seeds: Sequence[int],
    split: str = "test",
) -> PairedDifference | None:
    """``b - a`` on the ``split`` rows after the last round, over ``seeds``."""
    pairs = []
    for s in seeds:
        la = split_loss(per_seed[s][setting][a][-1], split)
        lb = split_loss(per_seed[s][setting][b][-1], split)
        if la is not None and lb is not None:
            pairs.append((la, lb))
    return paired_over_seeds(pairs) if pairs else None


def curve(
    per_seed: Mapping[int, Mapping[str, Any]], setting: str, name: str, seeds: Sequence[int], split: str
) -> list[tuple[float, float]]:
    """(cumulative total bytes, loss) after every scored round, both averaged over ``seeds``."""
    records = [per_seed[s][setting][name] for s in seeds]
    points = []
    for t in range(len(records[0])):
        losses = [split_loss(r[t], split) for r in records]
        if any(loss is None for loss in losses):
            continue
        spent = mean([total_bytes(r[: t + 1]) for r in records])
        points.append((spent, mean([loss.loss for loss in losses if loss is not None])))
    return points


def below_everywhere(
    ours: Sequence[tuple[float, float]], theirs: Sequence[tuple[float, float]], start: int
) -> bool:
    """Whether at each of ``theirs``' points from index ``start`` on, our best loss within that many
    bytes is at or below theirs (no point of ours within the budget: not below)."""
    for spent, loss in theirs[start:]:
        within = [lo for b, lo in ours if b <= spent]
        if not within or min(within) > loss:
            return False
    return True


def setting_report(per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int) -> dict[str, Any]:
    """The chosen configurations of one rank setting, their test table, the goal and the curves."""
    best, val = chosen(per_seed, setting, rounds), choose(per_seed, setting, rounds)[1]
    done = finished(per_seed, setting, rounds)
    baselines = {f: v for f, v in best.items() if f != OURS}
    if not baselines or OURS not in best:
        return {"chosen": best, "validation": val, "complete": False}
    reference = min(baselines.values(), key=lambda v: val[v])
    flora = best.get("FLoRA")
    rows: list[dict[str, Any]] = []
    for fam, name in sorted(best.items(), key=lambda kv: val[kv[1]]):
        seeds = sorted(set(done[name]) & set(done[reference]))
        d = paired(per_seed, setting, reference, name, seeds)
        tests = [split_loss(per_seed[s][setting][name][-1], "test") for s in done[name]]
        rows.append({
            "family": fam, "variant": name, "seeds": done[name], "validation_loss": val[name],
            "test_loss": mean([t.loss for t in tests if t is not None]),
            "vs_best_baseline": d.to_dict() if d else None,
            "total_bytes": mean([total_bytes(per_seed[s][setting][name]) for s in done[name]]),
        })  # fmt: skip
    size = {r["variant"]: r["total_bytes"] for r in rows}
    ours = best[OURS]
    curves = {
        split: {name: curve(per_seed, setting, name, done[name], split) for name in best.values()}
        for split in ("validation", "test")
    }
    d_ours = next(r["vs_best_baseline"] for r in rows if r["variant"] == ours)
    verdict = {
        "reference": reference,
        "loss_ok": d_ours is not None and d_ours["high"] <= TOLERANCE,
        "x_fewer_than_reference": size[reference] / size[ours],
        "x_fewer_than_flora": size[flora] / size[ours] if flora else None,
        "curve_below_every_baseline": all(
            below_everywhere(curves["test"][ours], curves["test"][v], start=2) for v in baselines.values()
        ),
    }
    verdict["met"] = bool(
        verdict["loss_ok"]
        and verdict["x_fewer_than_reference"] >= VS_BEST
        and (verdict["x_fewer_than_flora"] or 0) >= VS_FLORA
        and verdict["curve_below_every_baseline"]
    )
    return {
        "chosen": best,
        "validation": val,
        "rows": rows,
        "curves": curves,
        "goal": verdict,
        "complete": True,
    }


def ladder(per_seed: Mapping[int, Mapping[str, Any]], setting: str, rounds: int) -> list[dict[str, Any]]:
    """The ``LADDER`` rungs both of whose variants finished: each paired against its previous rung on
    the *validation* rows (a diagnosis, so the test rows stay for the chosen table), over the seeds
    both finished, with both variants' total bytes."""
    done = finished(per_seed, setting, rounds)
    rungs = []
    for name, previous, change in LADDER:
        seeds = sorted(set(done.get(name, ())) & set(done.get(previous, ())))
        d = paired(per_seed, setting, previous, name, seeds, "validation") if seeds else None
        if d is None:
            continue
        spent = [mean([total_bytes(per_seed[s][setting][v]) for s in seeds]) for v in (previous, name)]
        rungs.append({"variant": name, "versus": previous, "change": change, "seeds": seeds,
                      "difference": d.to_dict(), "bytes": spent})  # fmt: skip
    return rungs


def ladder_markdown(rungs: Sequence[Mapping[str, Any]]) -> str:
    if not rungs:
        return ""
    lines = [
        "\nFrom FlexLoRA to FLoRIST one difference at a time: each rung's final validation loss minus "
        "the rung it follows, paired on the validation rows over the seeds both finished (95 % CI); "
        "negative: the change helps.\n",
        "| rung | against | what changes | seeds | validation difference (95 % CI) | total bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rungs:
        d = r["difference"]
        lines.append(
            f"| {r['variant']} | {r['versus']} | {r['change']} | {len(r['seeds'])} | "
            f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | "
            f"{r['bytes'][0] / 1e6:.1f} -> {r['bytes'][1] / 1e6:.1f} MB |"
        )
    return "\n".join(lines) + "\n"


def markdown(setting: str, rep: Mapping[str, Any], seeds: Sequence[int]) -> str:
    lines = [f"\n## {setting} ranks\n"]
    if not rep.get("complete"):
        chosen = ", ".join(f"{k}: {v}" for k, v in rep.get("chosen", {}).items()) or "nothing finished yet"
        return "\n".join(
            [*lines, f"Incomplete (needs FLoRIST and a baseline finished). Finished so far: {chosen}.\n"]
        )
    g = rep["goal"]
    lines += [
        f"Chosen on validation (lowest final validation loss per method on seed {min(seeds)}, which every "
        f"candidate ran; the other seeds rerun the choice, and the losses are means over the seeds a row "
        f"lists); test scored for these rows only. Reference: the best baseline, **{g['reference']}**.\n",
        "| method | configuration (chosen on validation) | seeds | validation loss | test loss "
        "| test vs best baseline, paired over seeds (95 % CI) | total bytes | x fewer than best baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    ref_bytes = next(r["total_bytes"] for r in rep["rows"] if r["variant"] == g["reference"])
    for r in rep["rows"]:
        d = r["vs_best_baseline"]
        diff = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "-"
        lines.append(
            f"| {r['family']} | {r['variant']} | {len(r['seeds'])} | {r['validation_loss']:.4f} | "
            f"{r['test_loss']:.4f} | {diff} | {r['total_bytes'] / 1e6:.2f} MB | "
            f"{ref_bytes / r['total_bytes']:.1f}x |"
        )
    return "\n".join([*lines, "", goal_line(g), ""])


def goal_line(g: Mapping[str, Any]) -> str:
    flora = f"{g['x_fewer_than_flora']:.1f}x" if g["x_fewer_than_flora"] else "FLoRA not run: no"
    curve = "at or below" if g["curve_below_every_baseline"] else "not below"
    return (
        f"Goal (FLoRIST no worse than the best baseline, upper end <= +{TOLERANCE} nats; >= {VS_BEST:.0f}x "
        f"fewer bytes than it and >= {VS_FLORA:.0f}x fewer than FLoRA; its test curve at or below every "
        f"baseline's at every byte budget from round 3): **{'met' if g['met'] else 'not met'}** (loss "
        f"{'ok' if g['loss_ok'] else 'not ok'}; {g['x_fewer_than_reference']:.1f}x fewer bytes than "
        f"{g['reference']}; {flora} fewer than FLoRA; curve {curve} every baseline's)."
    )


def plot_curves(rep: Mapping[str, Any], path: Path, title: str) -> None:
    """Held-out loss against cumulative total bytes (log scale), validation and test side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=False)
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    for ax, split in zip(axes, ("validation", "test"), strict=True):
        for i, (name, points) in enumerate(sorted(rep["curves"][split].items())):
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "-" if family(name) == OURS else "--"
            ax.plot([x / 1e6 for x in xs], ys, style, marker="o", ms=3, color=colors[i % 10], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes, up + down, all clients (MB, log)")
        ax.set_ylabel(f"{split} loss (nats per response token)")
        ax.set_title(f"{split} split")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_fair_report(out: Path, settings: Sequence[str], rounds: int) -> dict[str, Any]:
    """``fair.md``, ``fair.json`` and the curves from every seed's results under ``out``."""
    per_seed = read_seeds(out)
    seeds = sorted(per_seed)
    text = [
        "# The fair headline: every method at its best, chosen on validation, over training seeds\n",
        f"Seeds found: {seeds}; rounds: {rounds}. Made by `benchmarks/fair_parallel.py` (the commands are in "
        "this folder's README).",
    ]
    summary: dict[str, Any] = {"seeds": seeds, "rounds": rounds}
    for setting in settings:
        rep = setting_report(per_seed, setting, rounds)
        rep["ladder"] = ladder(per_seed, setting, rounds)
        summary[setting] = rep
        text.append(markdown(setting, rep, seeds) + ladder_markdown(rep["ladder"]))
        if rep.get("complete"):
            plot_curves(
                rep, out / f"curves_{setting}.png", f"{setting} ranks: loss vs bytes, mean over seeds {seeds}"
            )
    write_json_atomic(out / "fair.json", summary)
    write_text_atomic(out / "fair.md", "\n".join(text) + "\n")
    return summary


def write_skills_report(out: Path) -> dict[str, Any]:
    """``OUT/skills.md`` and ``skills.json`` from the skills bench in ``out`` (one seed, homogeneous
    ranks, one skill per client): per configuration, exact match on every skill's test rows after
    the last round (overall and per skill), held-out loss and total bytes, best exact match first."""
    path = out / "results.json"
    results = json.loads(path.read_text()).get("homogeneous", {}) if path.is_file() else {}
    rows = []
    for name, records in results.items():
        ev = records[-1].get("eval") if records else None
        if not ev or "exact_match" not in ev:
            continue
        skills = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("exact_match/")}
        rows.append({"variant": name, "rounds": len(records) if name != BASE else 0,
                     "exact_match": ev["exact_match"], "per_skill": skills,
                     "heldout_loss": ev.get("heldout_loss"),
                     "total_bytes": total_bytes(records)})  # fmt: skip
    rows.sort(key=lambda r: -r["exact_match"])
    names = sorted({k for r in rows for k in r["per_skill"]})
    lines = [
        "# The skills task: one skill per client, exact match\n",
        "The embedded skills set, 7 clients each holding one skill, homogeneous ranks, training seed 0; "
        "every configuration is its method's choice on the Dolly validation split. Exact match on every "
        "skill's test rows after the last round. Made by `benchmarks/fair_parallel.py --stage skills`.\n",
        "| configuration | rounds | exact match | " + " | ".join(names) + " | held-out loss | total bytes |",
        "|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for r in rows:
        per = " | ".join(f"{r['per_skill'].get(k, float('nan')):.3f}" for k in names)
        loss = "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}"
        lines.append(f"| {r['variant']} | {r['rounds']} | {r['exact_match']:.3f} | {per} | {loss} | "
                     f"{r['total_bytes'] / 1e6:.1f} MB |")  # fmt: skip
    write_json_atomic(out / "skills.json", {"rows": rows})
    write_text_atomic(out / "skills.md", "\n".join(lines) + "\n")
    return {"rows": rows}
