"""Attention for packed batches: each example attends causally to itself only.

A packed batch (``florist.data.tokenize.pack``) is one row of N = sum L_i tokens with
``cu_seq_lens`` = [0, L_1, L_1 + L_2, ..., N]. Attention must be block-diagonal and causal:

    out[a:b] = softmax(q[a:b] k[a:b]^T * scale + causal) v[a:b]      for each example [a, b)

transformers detects packing from ``position_ids`` and builds a dense (N, N) mask for SDPA, which
computes every cross-example block only to mask it. Here the model's attention is switched, for
the duration of ``packed_attention(model)``, to ``florist_packed``: with ``cu_seq_lens_q`` in the
forward's kwargs and no mask it runs SDPA once per example (``is_causal``, no mask, on CPU the
math kernel, which is the fastest for rows of a few hundred tokens here); any other call (a
padded batch, generation with a cache) goes to transformers' own SDPA unchanged. Flash-attention
models read ``cu_seq_lens_q`` natively and are left as they are.

    with packed_attention(model):
        out = model(**packed_forward_kwargs(batch))
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "florist_packed"
_registered = False


def _segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Per-example causal SDPA for a packed row; transformers' SDPA otherwise.

    ``query`` (1, H, N, D), ``key`` and ``value`` (1, H_kv, N, D); returns (1, N, H, D).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = boundaries(cu, kwargs.get("position_ids"), query.shape[2])
    kernel = sdpa_kernel(SDPBackend.MATH) if query.device.type == "cpu" else contextlib.nullcontext()
    outs = []
    with kernel:
        for a, b in itertools.pairwise(bounds):
            sl = slice(a, b)
            out, _ = sdpa_attention_forward(
                module, query[:, :, sl], key[:, :, sl], value[:, :, sl], None, is_causal=True, **kwargs
            )
            outs.append(out)  # (1, L_i, H, D)
    return torch.cat(outs, dim=1), None


def boundaries(cu: torch.Tensor | None, position_ids: torch.Tensor | None, n: int) -> list[int]:
    """Example offsets [0, ..., n] of a packed row: ``cu`` when given, else where ``position_ids``
    (1, n) restart; [0, n] for a row that is one example."""
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    if position_ids is None:
        return [0, n]
    starts = (torch.diff(position_ids[0]) != 1).nonzero()[:, 0] + 1
    return [0, *(int(x) for x in starts.tolist()), n]


def _mask(attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a packed row (the attention above splits it); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make ``florist_packed`` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _segment_attention)
    AttentionMaskInterface.register(NAME, _mask)
    _registered = True


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct transformers config inside ``model`` (a PeftModel wraps one)."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, an SDPA model attends per example on packed rows (see above); an eager one
    keeps transformers' dense packed mask, a flash-attention one its own varlen path."""
    configs = [c for c in _configs(model) if c._attn_implementation == "sdpa"]
    if configs:
        register()
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, impl in zip(configs, saved, strict=True):
            c._attn_implementation = impl


def packed_forward_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward kwargs of a packed batch: ids, positions and the example boundaries, no mask, no cache."""
    cu = batch["cu_seq_lens"]
    longest = int((cu[1:] - cu[:-1]).max())
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
