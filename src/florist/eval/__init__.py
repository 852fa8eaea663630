"""Evaluation: MMLU by answer-letter log-likelihood and held-out loss on response tokens."""

from florist.eval.heldout import LossResult, heldout_loss
from florist.eval.mmlu import MmluItem, MmluResult, load_mmlu, score_mmlu, subset

__all__ = ["LossResult", "MmluItem", "MmluResult", "heldout_loss", "load_mmlu", "score_mmlu", "subset"]
