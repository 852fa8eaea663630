"""Compute precision: detection, config keys, and bf16 autocast in training and evaluation (tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from florist import precision as prec
from florist.client.lm_loss import mean_token_loss
from florist.client.lora_state import extract
from florist.client.train import TrainSettings, encode_all, train
from florist.config import load_config
from florist.config.schema import AdapterConfig
from florist.data.records import Example
from florist.data.tokenize import collate
from florist.errors import ConfigError
from florist.eval.heldout import heldout_loss
from tests.peft_helpers import tiny_llama
from tests.tiny_tokenizer import VOCAB_SIZE, tiny_tokenizer

DATA = [Example(f"Add {a} and {b}.", str(a + b), category="add") for a in range(4) for b in range(4)]


def _peft(seed: int = 0) -> torch.nn.Module:
    from peft import get_peft_model

    from florist.client.lora_state import reinit

    lora = AdapterConfig(ranks=(4,), alpha=8, dropout=0.05, target_modules=("q_proj", "v_proj"))
    model = get_peft_model(tiny_llama(vocab_size=VOCAB_SIZE, initializer_range=0.2), lora.peft_config())
    reinit(model, seed)
    return model


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ("fpu sse avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
        ("fpu avx512f amx_bf16 amx_tile avx512_bf16", "amx_bf16"),
        ("fp asimd sve bf16 i8mm", "bf16"),  # Arm "Features"
        ("fpu sse avx2 avx512f avx512bw", None),  # AVX-512 without bf16: emulated, not native
        ("", None),
    ],
)
def test_bf16_flag_from_cpu_flags(flags: str, want: str | None) -> None:
    assert prec.first_bf16_flag(set(flags.split())) == want


@pytest.mark.parametrize(("flag", "want"), [("avx512_bf16", "bf16"), (None, "fp32")])
def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, flag: str | None, want: str) -> None:
    monkeypatch.setattr(prec, "cpu_bf16_flag", lambda: flag)
    p = prec.resolve("auto", "cpu")
    assert p.name == want
    assert p.reason.startswith("auto: ") and ((flag or "no native bf16") in p.reason)


def test_explicit_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_bf16_flag", lambda: None)
    assert prec.resolve("fp32", "cpu").name == "fp32"
    emulated = prec.resolve("bf16", "cpu")  # honoured, and the log says it is emulated
    assert emulated.bf16 and "emulated" in emulated.reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="bf16.*no bf16 support"):
        prec.resolve("bf16", "cuda")
    assert prec.resolve("auto", "cuda").name == "fp32"


def test_autocast_context() -> None:
    x = torch.randn(3, 4)
    with prec.Precision("bf16", "cpu", "test").autocast():
        assert (x @ x.T).dtype == torch.bfloat16
    with prec.Precision("fp32", "cpu", "test").autocast():
        assert (x @ x.T).dtype == torch.float32


@pytest.mark.parametrize("key", ["train.precision", "eval.precision"])
def test_config_rejects_an_unknown_precision(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"):
        load_config(None, [f"{key}='fp16'"])
    assert load_config(None, [f"{key}='bf16'"]) is not None


def test_labelled_logits_loss_equals_transformers_loss() -> None:
    """Projecting only the labelled positions gives transformers' ``labels=`` loss (response-only labels)."""
    model, tok = _peft(), tiny_tokenizer()
    enc = encode_all(DATA[:6], tok, TrainSettings(max_length=256))
    batch = collate(enc, pad_id=0)
    model.eval()
    with torch.no_grad():
        ours = mean_token_loss(model, batch)
        ref = model(**batch).loss
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def _train(precision: str, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    model, tok = _peft(), tiny_tokenizer()
    s = TrainSettings(lr=5e-3, steps=4, batch_size=4, max_length=256, precision=precision)
    stats = train(model, encode_all(DATA, tok, s), s, seed=seed, pad_id=0)
    return model, stats.losses


def test_bf16_training_keeps_fp32_state_and_is_close_to_fp32() -> None:
    bf_model, bf_losses = _train("bf16")
    fp_model, fp_losses = _train("fp32")
    for name, f in extract(bf_model).items():
        assert f.A.dtype == f.B.dtype == torch.float32, name
    for p in bf_model.parameters():
        assert p.dtype == torch.float32  # base weights are never rounded; autocast casts on the fly
    assert bf_losses != fp_losses  # bf16 really ran
    torch.testing.assert_close(torch.tensor(bf_losses), torch.tensor(fp_losses), rtol=0.02, atol=0.02)
    for name, f in extract(bf_model).items():
        ref = extract(fp_model)[name]
        rel = float((f.B @ f.A - ref.B @ ref.A).norm() / (ref.B @ ref.A).norm())
        assert rel < 0.25, (name, rel)  # tiny hidden size: bf16 noise is large relative to 4 Adam steps


def test_bf16_training_is_bitwise_reproducible() -> None:
    a, losses_a = _train("bf16")
    b, losses_b = _train("bf16")
    assert losses_a == losses_b
    for name, f in extract(a).items():
        assert torch.equal(f.B, extract(b)[name].B), name


def test_bf16_heldout_loss_is_close_to_fp32() -> None:
    model, tok = _peft(), tiny_tokenizer()
    fp = heldout_loss(model, tok, DATA, max_length=256, progress=False)
    with prec.Precision("bf16", "cpu", "test").autocast():
        bf = heldout_loss(model, tok, DATA, max_length=256, progress=False)
    assert bf.n_tokens == fp.n_tokens and bf.loss != fp.loss
    assert abs(bf.loss - fp.loss) < 0.01 * fp.loss


def test_frozen_weights_cast_is_bitwise_autocast_and_restores_the_weights() -> None:
    model = tiny_llama(vocab_size=VOCAB_SIZE, tie_word_embeddings=True)
    ids = torch.randint(3, VOCAB_SIZE, (2, 12))
    bf16 = prec.Precision("bf16", "cpu", "test")
    before = {n: p for n, p in model.named_parameters()}
    with torch.no_grad(), bf16.autocast():
        ref = model(input_ids=ids).logits
        with bf16.frozen_weights_cast(model, everything=True):
            assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
            got = model(input_ids=ids).logits
    assert torch.equal(got, ref)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives
    with prec.Precision("fp32", "cpu", "test").frozen_weights_cast(model, everything=True):
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_frozen_weights_cast_leaves_trainable_lora_alone_and_restores_on_error() -> None:
    model = _peft()
    bf16 = prec.Precision("bf16", "cpu", "test")
    with pytest.raises(RuntimeError, match="boom"), bf16.frozen_weights_cast(model):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == torch.float32  # trains: stays float32
        raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 for p in model.parameters())
