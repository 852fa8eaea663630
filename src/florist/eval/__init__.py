"""Evaluation: MMLU by answer-letter log-likelihood, held-out loss on response tokens, exact match."""

from florist.eval.exact_match import EMResult, exact_match
from florist.eval.heldout import LossResult, heldout_loss
from florist.eval.mmlu import MmluItem, MmluResult, load_mmlu, score_mmlu, subset

__all__ = [
    "EMResult",
    "LossResult",
    "MmluItem",
    "MmluResult",
    "exact_match",
    "heldout_loss",
    "load_mmlu",
    "score_mmlu",
    "subset",
]
