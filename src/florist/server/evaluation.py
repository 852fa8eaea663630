"""Server-side evaluation of the global model: exact match, held-out loss, MMLU (as configured)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from florist.config import EvalConfig
from florist.data.records import Example
from florist.eval import exact_match, heldout_loss, load_mmlu, score_mmlu, subset
from florist.eval.heldout import model_device
from florist.precision import log_choice, resolve

log = logging.getLogger(__name__)


class Evaluator:
    """Scores a model on a fixed held-out set (and MMLU subset) chosen once from the config."""

    def __init__(
        self, cfg: EvalConfig, test: Sequence[Example], seed: int, progress: bool = True, rows: bool = False
    ) -> None:
        """``rows``: also return each held-out row's loss and token count (for paired comparisons)."""
        self.cfg, self.progress, self.rows = cfg, progress, rows
        self.test = _subset(list(test), cfg.subset, seed)
        self.mmlu = subset(load_mmlu(cfg.mmlu), cfg.mmlu_subset, seed) if cfg.mmlu else []

    def due(self, round: int, last: int) -> bool:
        """Whether to evaluate after ``round`` (0: the base model before training)."""
        if round == 0:
            return self.cfg.before
        if self.cfg.every == 0:
            return False
        return round % self.cfg.every == 0 or round == last

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        precision = resolve(self.cfg.precision, model_device(model))
        log_choice("evaluation", precision)
        with precision.autocast(), precision.frozen_weights_cast(model, everything=True):
            return self._score(model, tokenizer)

    def _score(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        start, out = time.perf_counter(), dict[str, Any]()
        c = self.cfg
        if c.exact_match and self.test:
            em = exact_match(model, tokenizer, self.test, c.max_new_tokens, c.batch_size, self.progress)
            out["exact_match"] = em.accuracy
            out |= {f"exact_match/{k}": v for k, v in em.per_category.items()}
        if c.heldout_loss and self.test:
            loss = heldout_loss(
                model, tokenizer, self.test, c.max_length, c.batch_size, self.progress, c.batching
            )
            out |= {"heldout_loss": loss.loss, "perplexity": loss.perplexity}
            if self.rows:
                out |= {
                    "heldout_rows": loss.to_dict()["per_example"],
                    "heldout_tokens": loss.per_example_tokens,
                }
        if self.mmlu:
            res = score_mmlu(model, tokenizer, self.mmlu, max(1, c.batch_size // 2), self.progress)
            out |= {"mmlu_micro": res.micro, "mmlu_macro": res.macro}
        out["eval_seconds"] = time.perf_counter() - start
        return out


def _subset(items: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(f"{seed}:eval").sample(range(len(items)), n))
    return [items[i] for i in keep]
