"""A tiny Llama + tokenizer saved as a model dir, and run configs for Flower simulation tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from florist.config import FloristConfig, load_config
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer


def save_tiny_model(path: Path, **overrides: Any) -> Path:
    tiny_llama(0, vocab_size=VOCAB_SIZE, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_run_config(model_dir: Path, run_dir: Path, name: str, *overrides: str, **_: Any) -> FloristConfig:
    """3 clients with ranks 8, 4, 2; 2 rounds of 2 steps on a few skills examples; client uploads kept."""
    base = [
        f"model.name={str(model_dir)!r}",
        "federation.num_clients=3",
        "federation.rounds=2",
        "lora.ranks=[8, 4, 2]",
        "train.steps=2",
        "train.batch_size=2",
        "train.lr=0.01",
        "data.skills_train=6",
        "data.skills_test=2",
        "eval.max_new_tokens=3",
        "eval.every=2",
        f"run.dir={str(run_dir)!r}",
        f"run.name={name!r}",
        "run.save_client_updates=true",
        "run.progress=false",
    ]
    return load_config(None, [*base, *overrides])
