"""Random Llama-family models for tests, benchmarks and scripts (nothing in the package imports this module)."""
from __future__ import annotations

import torch

from layerskip.errors import LayerSkipError


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
    """A randomly initialised Llama-family causal LM (fp32, eval mode), seeded.

    Args:
        arch: "llama", "mistral", "qwen2" or "qwen3".
        num_layers .. tie_word_embeddings: the shape (intermediate_size defaults to 2 * hidden_size,
            num_kv_heads to num_heads).
        seed: torch seed for the initial weights.
        config_kwargs: passed on to the transformers config (e.g. head_dim, eos_token_id).
    Returns:
        the model, e.g. `transformers.LlamaForCausalLM`.
    """
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
    return model_cls(config).eval()


def make_exact_from(model, exit_layer: int):
    """Make layers >= exit_layer identities on the residual stream (o_proj and down_proj zeroed), in place: every
    draft at exit_layer is then exact (acceptance 1.0), the reference case for self-speculation. Returns model."""
    with torch.no_grad():
        for layer in model.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model
