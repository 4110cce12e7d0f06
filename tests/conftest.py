"""Shared fixtures: tiny random transformers models (CPU, fp32, seconds to build)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from layerskip.testing import make_random_model

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_llama():
    """4 layers, width 64, GQA (4 query / 2 key-value heads), vocab 256, untied head."""
    return make_random_model("llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_models():
    """One small random model per supported architecture, keyed by name."""
    return {
        "llama": make_random_model("llama", num_layers=4, num_kv_heads=2, seed=1),
        "llama-tied": make_random_model("llama", num_layers=3, tie_word_embeddings=True, seed=2),
        "mistral": make_random_model("mistral", num_layers=4, num_kv_heads=2, seed=3, head_dim=16),
        "qwen2": make_random_model("qwen2", num_layers=4, num_kv_heads=2, seed=4),
        "qwen3": make_random_model("qwen3", num_layers=4, num_kv_heads=2, seed=5, head_dim=16),
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved checkpoint directory (random Llama + a byte-level BPE tokenizer trained on stdlib code)."""
    from layerskip.corpus import read_texts, stdlib_files
    from layerskip.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tiny-checkpoint")
    tokenizer = train_bpe_tokenizer(read_texts(stdlib_files("train"), max_chars=300_000), 512, out)
    model = make_random_model("llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                              vocab_size=len(tokenizer), seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    return out
