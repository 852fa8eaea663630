"""``florist eval RUN --tasks ...``: a run's adapter scored by lm-evaluation-harness, the tool people
compare models with, beside (``--with-base``) the base it trained on, paired per document.

    florist eval runs/florist-20261206-101500 --tasks hellaswag,arc_easy --with-base
    florist eval runs/... --tasks my_task --include my_tasks/ --limit 200 -o scores.json

The base is the one the run trained on (``florist_base.json``; the embedded SmolLM2 as florist
converted it), else the adapter's ``base_model_name_or_path``, else ``--base``; the adapter goes on
it unmerged through peft. Any task lm-eval knows works where its data set can be fetched; a task of
your own (a YAML file whose ``dataset_path: json`` reads local files) works offline through
``--include DIR``. An adapter trained with ``data.template = "chat"`` is scored through the model's
chat template (lm-eval's ``apply_chat_template``) unless ``--chat-template off``; an Alpaca-template
adapter sees each task's own prompt format, as every other model lm-eval scores.

``--with-base`` scores the base on the same documents and reports, for every metric lm-eval averages
per document (accuracy, exact match), the paired difference adapter - base with a t-interval over
documents (its standard error is far smaller than either score's). Results go to
``RUN/lm_eval/results-<UTC time>.json`` (or ``-o FILE``): lm-eval's numbers per model, the paired
differences, the task versions and the settings. The paper's MMLU-1444 protocol stays in
``florist.eval.mmlu`` (``eval.mmlu`` during a run); this is the standard harness beside it.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from florist.cli_parsing import names
from florist.errors import ConfigError
from florist.eval.paired import t_quantile
from florist.fsutil import write_json_atomic

log = logging.getLogger(__name__)
RESULTS_DIR = "lm_eval"  # in a run directory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="RUN_OR_ADAPTER", help="a run directory (its adapter/) or a PEFT adapter dir"
    )
    p.add_argument(
        "--tasks", type=names, required=True, help="comma-separated lm-eval task or group names (globs too)"
    )
    p.add_argument("--include", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm-eval task YAML files (repeatable)")  # fmt: skip
    p.add_argument("--limit", type=_limit, help="at most this many documents per task (or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass")
    p.add_argument("--base", help="the base model (default: the one the run trained on)")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present"
    )
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"),
                   help="auto: on when the adapter trained with data.template = 'chat'")  # fmt: skip
    p.add_argument("--with-base", action="store_true", help="also score the base; paired differences")
    p.add_argument("-o", "--out", help="results JSON (default: RUN/lm_eval/results-<UTC time>.json)")


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from err
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count or fraction, got {text!r}")
    return value if value < 1 else int(value)


def main(args: argparse.Namespace) -> None:
    from florist.tables import make_console

    out = _output(args.source, args.out)
    report = evaluate(
        args.source,
        args.tasks,
        include=args.include,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        chat_template=args.chat_template,
        with_base=args.with_base,
    )
    console = make_console()
    console.print(results_table(report))
    if out is not None:
        write_json_atomic(out, report)
        console.print(f"results: {out}")


def lm_eval_modules() -> tuple[Any, Any, Any]:
    """``(lm_eval, HFLM, TaskManager)``, or a ``ConfigError`` that says how to install them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(
            f"florist eval needs lm-evaluation-harness ({err}): pip install 'florist[eval]' "
            "(or pip install 'lm-eval>=0.4.13,<0.5')"
        ) from err
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a local JSON file's "Generating test split" bar; lm-eval's own bars stay
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices; errors still show
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
    return lm_eval, HFLM, TaskManager


def task_manager(include: Sequence[str], tasks: Sequence[str]) -> Any:
    """lm-eval's task index with ``include`` folders added; every name in ``tasks`` must match a task,
    group or tag in it, else a ``ConfigError`` naming the unknown ones and the nearest known names."""
    _, _, TaskManager = lm_eval_modules()
    paths = []
    for folder in include:
        path = Path(folder)
        if not path.exists():
            raise ConfigError(f"--include {folder!r}: no such folder")
        paths.append(str(path if path.is_dir() else path.parent))  # a YAML file: its folder
    if not tasks:
        raise ConfigError("--tasks names no task")
    manager = TaskManager(include_path=paths or None)
    known = list(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not fnmatch.filter(known, t)]
    if unknown:
        hints = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3)})
        hint = f" (nearest: {', '.join(hints)})" if hints else ""
        where = f" in lm-eval or {', '.join(include)}" if include else " in lm-eval (your own: --include DIR)"
        raise ConfigError(f"unknown task{'s' * (len(unknown) > 1)} {', '.join(unknown)}{where}{hint}")
    return manager


def evaluate(
    source: str,
    tasks: Sequence[str],
    *,
    include: Sequence[str] = (),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    base: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: str = "auto",
    with_base: bool = False,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Score ``source``'s adapter (and with ``with_base`` its base) on ``tasks``; the report that
    ``florist eval`` writes (with ``keep_samples`` also lm-eval's per-document records, per model)."""
    import torch
    from peft import PeftModel

    from florist.client.model import check_base_fits, load_model
    from florist.lora.peft_io import adapter_dir, florist_base, florist_template, read_adapter
    from florist.lora.validation import validate_updates

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    lm_eval, HFLM, _ = lm_eval_modules()
    src = adapter_dir(source)
    adapter = read_adapter(src)
    validate_updates([adapter.to_update(str(src), 1.0)])
    base = base or florist_base(src) or adapter.base_model_name_or_path
    if not base:
        raise ConfigError(f"{str(src)!r} names no base model: give --base")
    manager = task_manager(include, tasks)  # before the model loads: a typo costs seconds, not minutes
    template = florist_template(src)
    use_chat = chat_template == "on" or (chat_template == "auto" and template == "chat")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    torch_dtype = (
        torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and device == "cuda") else torch.float32
    )
    model, tokenizer = load_model(base, torch_dtype)
    check_base_fits(adapter, model, str(src), base)
    model = PeftModel.from_pretrained(model, str(src)).to(device)
    model.train(False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)

    def run() -> Any:
        try:
            return lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                apply_chat_template=use_chat, log_samples=True, random_seed=0,
            )  # fmt: skip
        except (OSError, ConnectionError) as err:  # a task's data set: not on disk, or the hub unreachable
            raise ConfigError(f"lm-eval could not load a task's data: {err}") from err

    started = time.perf_counter()
    scored = {"adapter": run()}
    if with_base:
        with model.disable_adapter():
            scored["base"] = run()
    first = scored["adapter"]
    report: dict[str, Any] = {
        "source": str(src),
        "base_model": base,
        "tasks": list(tasks),
        "settings": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "device": device,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "chat_template": use_chat,
            "adapter_template": template,
        },
        "results": {who: _plain(r["results"]) for who, r in scored.items()},
        "n_samples": _plain(first.get("n-samples", {})),
        "versions": _plain(first.get("versions", {})),
        "n_shot": _plain(first.get("n-shot", {})),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if with_base:
        report["paired"] = paired_differences(scored["base"], scored["adapter"])
    if keep_samples:
        report["samples"] = {who: r["samples"] for who, r in scored.items()}
    return report


def _plain(value: Any) -> Any:
    """lm-eval's result dicts as JSON values (a few hold numpy numbers or tuples)."""
    return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def paired_differences(
    base: Mapping[str, Any], adapter: Mapping[str, Any], level: float = 0.95
) -> dict[str, Any]:
    """Per task and ``metric,filter``: adapter - base over the documents both scored, for every
    metric whose reported value is the mean of its per-document values (the others, corpus-level
    metrics such as BLEU, have no per-document difference)."""
    out: dict[str, Any] = {}
    for task, records in adapter["samples"].items():
        theirs = {(r["doc_id"], r["filter"]): r for r in base["samples"].get(task, [])}
        for key, reported in adapter["results"].get(task, {}).items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(reported, (int, float)):
                continue
            pairs = []
            for r in records:
                other = theirs.get((r["doc_id"], filt), {})
                if r["filter"] == filt and _number(r.get(metric)) and _number(other.get(metric)):
                    pairs.append((float(other[metric]), float(r[metric])))
            mean = sum(b for _, b in pairs) / max(len(pairs), 1)
            if len(pairs) < 2 or not math.isclose(mean, reported, abs_tol=1e-9):
                continue  # not a per-document mean
            out.setdefault(task, {})[key] = paired_mean(pairs, level)
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def paired_mean(pairs: Sequence[tuple[float, float]], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``b - a`` over the pairs with a t-interval: ``{"mean", "se", "low", "high", "n"}``."""
    d = [b - a for a, b in pairs]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    half = t_quantile((1 + level) / 2, n - 1) * se
    return {"mean": mean, "se": se, "low": mean - half, "high": mean + half, "level": level, "n": n}


def results_table(report: Mapping[str, Any]) -> Any:
    """One row per task and metric: the adapter's score (and the base's and the paired difference)."""
    from rich.table import Table

    models = list(report["results"])
    table = Table(title=f"lm-eval on {report['source']} (base {report['base_model']})")
    table.add_column("task")
    table.add_column("metric")
    for who in models:
        table.add_column(who, justify="right")
    if "paired" in report:
        table.add_column("adapter - base (95% CI)", justify="right")
    for task, metrics in report["results"]["adapter"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            cells = [_score(report["results"][who].get(task, {}), key) for who in models]
            if "paired" in report:
                d = report["paired"].get(task, {}).get(key)
                cells.append("" if d is None else f"{d['mean']:+.4f} ({d['low']:+.4f} to {d['high']:+.4f})")
            table.add_row(task, metric if filt == "none" else key, *cells)
    return table


def _score(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return ""
    metric, _, filt = key.partition(",")
    se = metrics.get(f"{metric}_stderr,{filt}")
    return f"{value:.4f} ± {se:.4f}" if isinstance(se, (int, float)) else f"{value:.4f}"


def _output(source: str, out: str | None) -> Path | None:
    """Where the results go: ``-o``, else ``RUN/lm_eval/`` for a run directory, else nowhere (printed)."""
    if out is not None:
        path = Path(out)
        if path.is_dir():
            raise ConfigError(f"-o {out!r} is a folder; give a file name")
        return path
    run = Path(source)
    if (run / "adapter" / "adapter_config.json").is_file():
        return run / RESULTS_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    log.info("an adapter directory, not a run: results printed only (-o FILE saves them)")
    return None
