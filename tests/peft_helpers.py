"""Tiny random Llama models and client adapters written by peft itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
SMOLLM2_SHAPES = dict(
    vocab_size=256,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def write_peft_client(
    base_factory: Any,
    path: Path,
    rank: int,
    *,
    seed: int,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    alpha: float | None = None,
    **lora: Any,
) -> Path:
    """Random non-zero LoRA weights on a fresh base, saved with ``save_pretrained``."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        init_lora_weights=False,
        **lora,
    )
    base = base_factory()  # it may seed torch itself: the LoRA draw below must follow ``seed``
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(str(path))
    return path


def merged_weights(base: LlamaForCausalLM, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Load ``adapter_dir`` with peft on ``base``, merge it and return the state dict."""
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()
