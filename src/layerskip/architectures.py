"""What the engine supports, read off a transformers config: a leaf module (it imports nothing of ours but errors).

`SUPPORTED_ARCHITECTURES` are the Llama-family decoder-only models whose forward `layerskip.forward` reproduces
(checked logit for logit in tests/test_forward.py). `check_config` runs on a config before any weight is read;
`check_supported` on a loaded model. `sliding_windows` gives each layer's attention window.
"""
from __future__ import annotations

from layerskip.errors import LayerSkipError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _check_name(name: str | None) -> None:
    if name not in SUPPORTED_ARCHITECTURES:
        raise LayerSkipError(f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def check_supported(model) -> None:
    """Raise LayerSkipError unless `model` is a supported causal LM."""
    _check_name(type(model).__name__)


def check_config(config) -> None:
    """Raise LayerSkipError unless a transformers config describes a supported causal LM (before loading weights)."""
    archs = getattr(config, "architectures", None) or [None]
    _check_name(archs[0])


def sliding_windows(config, num_layers: int) -> list[int | None]:
    """Per-layer sliding window (None = full attention), following each architecture's config."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2 / Qwen3 style: per-layer types
        return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]
    return [window] * num_layers  # Mistral style: one window for all layers (None = off)
