"""Packed batches give each example the loss and LoRA gradients of the padded batch (tiny Llama).

The reference is the padded batch, right-padded with an attention mask, through transformers' own
SDPA path; the packed batch is one row with per-example positions through
``florist.client.packed_attention``. float64 checks exactness to rounding, bf16 autocast checks the
path users run on CPUs with native bf16.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from florist.client.lm_loss import mean_token_loss
from florist.client.packed_attention import boundaries, packed_attention
from florist.client.train import TrainSettings, encode_all, train
from florist.config.schema import AdapterConfig
from florist.data.records import Example
from florist.data.tokenize import IGNORE, collate, example_of_position, make_batch, pack, real_tokens
from florist.errors import ConfigError
from florist.eval.heldout import heldout_loss
from florist.precision import Precision
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer

DATA = [
    Example(f"Add {a} and {b}." + " please" * (a * 3 + b), str(a + b) * (1 + a), category="add")
    for a in range(4)
    for b in range(3)
]


def _peft(dtype: torch.dtype = torch.float32, dropout: float = 0.0) -> Any:
    from peft import get_peft_model

    from florist.client.lora_state import reinit

    lora = AdapterConfig(ranks=(4,), alpha=8, dropout=dropout, target_modules=("q_proj", "v_proj"))
    base = tiny_llama(vocab_size=VOCAB_SIZE, initializer_range=0.2).to(dtype)
    model = get_peft_model(base, lora.peft_config())
    reinit(model, 0)
    for name, p in model.named_parameters():  # a B != 0 so that A's gradient is not zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _encoded(n: int = 6) -> list[Any]:
    return encode_all(DATA[:n], tiny_tokenizer(), TrainSettings(max_length=256))


def _loss_and_grads(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with packed_attention(model):
        loss = mean_token_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_pack_layout() -> None:
    enc = _encoded(3)
    b = pack(enc)
    lengths = [len(e) for e in enc]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["cu_seq_lens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert b["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    starts = b["cu_seq_lens"][:-1].long()
    assert (b["labels"][0, starts] == IGNORE).all()  # nothing predicts across a boundary
    padded = collate(enc, pad_id=0)
    assert real_tokens(b) == real_tokens(padded) == sum(lengths) < padded["input_ids"].numel()
    assert example_of_position(b)[0].tolist() == [k for k, n in enumerate(lengths) for _ in range(n)]
    assert boundaries(None, b["position_ids"], sum(lengths)) == b["cu_seq_lens"].tolist()
    with pytest.raises(ValueError, match="batching must be one of"):
        make_batch(enc, 0, "ragged")


def test_packed_loss_and_lora_gradients_equal_padded_float64() -> None:
    model, enc = _peft(torch.float64), _encoded(6)
    model.train()  # dropout is 0: the forward is deterministic
    ref_loss, ref_grads = _loss_and_grads(model, collate(enc, pad_id=0))
    loss, grads = _loss_and_grads(model, pack(enc))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(ref_grads) and any(float(g.abs().max()) > 0 for g in ref_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_packed_attention_never_crosses_examples() -> None:
    """Changing one example's tokens leaves the other examples' losses unchanged, bitwise."""
    model, enc = _peft(torch.float64), _encoded(3)
    from florist.eval.heldout import token_loss_sums

    with torch.no_grad():
        with packed_attention(model):
            sums, counts = token_loss_sums(model, pack(enc))
        changed = [enc[0].__class__(input_ids=[5] * len(enc[0]), labels=enc[0].labels), *enc[1:]]
        with packed_attention(model):
            sums2, _ = token_loss_sums(model, pack(changed))
    assert sums[0] != sums2[0]
    torch.testing.assert_close(sums[1:], sums2[1:], rtol=1e-13, atol=0.0)
    assert counts.tolist() == [sum(1 for t in e.labels[1:] if t != IGNORE) for e in enc]


def test_packed_equals_padded_under_bf16_autocast() -> None:
    model, enc = _peft(), _encoded(6)
    bf16 = Precision("bf16", "cpu", "test")
    with bf16.autocast():
        ref_loss, ref_grads = _loss_and_grads(model, collate(enc, pad_id=0))
        loss, grads = _loss_and_grads(model, pack(enc))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for name, g in grads.items():
        rel = float((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12))
        assert rel < 0.05, (name, rel)  # bf16 rounding of activations, not a different function


def test_heldout_loss_packed_equals_padded() -> None:
    model, tok = _peft(torch.float64), tiny_tokenizer()
    padded = heldout_loss(model, tok, DATA, batch_size=5, progress=False, batching="padded")
    packed = heldout_loss(model, tok, DATA, batch_size=5, progress=False, batching="packed")
    assert packed.n_tokens == padded.n_tokens and packed.per_example_tokens == padded.per_example_tokens
    torch.testing.assert_close(
        torch.tensor(packed.per_example), torch.tensor(padded.per_example), rtol=1e-11, atol=0
    )
    assert abs(packed.loss - padded.loss) < 1e-11


def test_training_packed_matches_padded_and_counts_real_tokens() -> None:
    """Same batches, same steps, no dropout: the trained LoRA agrees, and packing computes no padding."""
    enc = _encoded(12)
    out = {}
    for batching in ("padded", "packed"):
        model = _peft(torch.float64)
        s = TrainSettings(lr=1e-2, steps=3, batch_size=4, precision="fp32", batching=batching)
        stats = train(model, enc, s, seed=0, pad_id=0)
        out[batching] = (model, stats)
    (pm, ps), (km, ks) = out["padded"], out["packed"]
    assert (
        ks.tokens == ps.tokens == ks.positions < ps.positions
    )  # real tokens equal; padding only when padded
    torch.testing.assert_close(torch.tensor(ks.losses), torch.tensor(ps.losses), rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(pm.named_parameters(), km.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=name)


def test_packed_attention_restores_the_model() -> None:
    model = _peft()
    before = model.config._attn_implementation
    with packed_attention(model):
        assert model.config._attn_implementation == "florist_packed"
    assert model.config._attn_implementation == before == "sdpa"


@pytest.mark.parametrize("key", ["train.batching", "eval.batching"])
def test_config_rejects_an_unknown_batching(key: str) -> None:
    from florist.config import load_config

    with pytest.raises(ConfigError, match=rf"{key} must be one of \['padded', 'packed'\], got 'ragged'"):
        load_config(None, [f"{key}='ragged'"])
    assert load_config(None, [f"{key}='padded'"]) is not None


def _train_tiny(compile: bool, dropout: float = 0.05) -> tuple[Any, Any]:
    model = _peft(dropout=dropout)
    s = TrainSettings(lr=1e-2, steps=3, batch_size=4, precision="fp32", compile=compile)
    stats = train(model, _encoded(12), s, seed=0, pad_id=0)
    return model, stats


def test_compile_failure_falls_back_to_eager_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            raise RuntimeError("InductorError: no working C++ compiler\nmore lines")

        return call

    eager_model, eager = _train_tiny(compile=False)
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING"):
        model, stats = _train_tiny(compile=True)
    lines = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert lines == [
        "torch.compile failed (RuntimeError: InductorError: no working C++ compiler); training eagerly"
    ]
    assert stats.losses == eager.losses and stats.tokens == eager.tokens  # same batches, same dropout
    for a, b in zip(eager_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(layer._compiled_call_impl is None for layer in model.modules() if hasattr(layer, "self_attn"))


def test_compiled_training_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers traced by dynamo and differentiated by AOTAutograd, as ``train.compile`` runs them,
    on the ``aot_eager`` backend: inductor's C++ code generation (about 130 s on 2 CPU cores, torch's
    own code) runs in ``benchmarks/client_throughput.py``, whose compiled configuration trains and
    scores SmolLM2 and reports its loss against eager's."""
    real = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, **{**k, "backend": "aot_eager"})
    )
    eager_model, eager = _train_tiny(compile=False, dropout=0.0)
    model, stats = _train_tiny(compile=True, dropout=0.0)
    torch.testing.assert_close(torch.tensor(stats.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    assert stats.compile_seconds > 0
    assert all(layer._compiled_call_impl is None for layer in model.modules() if hasattr(layer, "self_attn"))
