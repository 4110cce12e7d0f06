"""The stand-in default model: created once and atomically, marked untrained, loadable by models.load."""
import json
import time

import pytest
import torch

from layerskip import models
from layerskip.errors import LayerSkipError
from layerskip.standin import STANDIN_SHAPE, VOCAB_SIZE, build_once, ensure_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return ensure_standin(root / "standin-model")


def test_created_with_marker_and_shape(standin):
    names = {p.name for p in standin.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert [p.name for p in standin.parent.iterdir()] == ["standin-model"]  # no temp dir left behind
    config = json.loads((standin / "config.json").read_text())
    assert config["layerskip"] == {"trained": False, "note": "untrained stand-in"}
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == STANDIN_SHAPE["num_layers"]
    assert config["hidden_size"] == STANDIN_SHAPE["hidden_size"]
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 2048
    assert config["vocab_size"] == VOCAB_SIZE
    assert (standin / "model.safetensors").stat().st_size <= 25_000_000  # issue 7's size budget


def test_second_call_returns_without_rebuilding(standin):
    before = (standin / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_standin(standin) == standin
    assert time.perf_counter() - start < 0.5
    assert (standin / "model.safetensors").stat().st_mtime_ns == before


def test_loadable_with_models_load(standin):
    model, tok = models.load(str(standin))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert models.num_layers(model) == STANDIN_SHAPE["num_layers"]
    assert len(tok) == model.config.vocab_size == VOCAB_SIZE
    assert model.config.layerskip["trained"] is False
    assert model.generation_config.eos_token_id == tok.eos_token_id == 0
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text).input_ids) == text
    ids = tok(text, return_tensors="pt").input_ids  # (1, T)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) or out[0, -1].item() == tok.eos_token_id


def test_default_spec_uses_the_cached_standin(standin, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_CACHE", str(standin.parent))
    if (models._PACKAGED_DEFAULT / "config.json").exists():
        pytest.skip("a trained default model ships in the package; the stand-in is not used")
    assert models.resolve(None) == standin


def test_failed_build_leaves_nothing(tmp_path):
    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "m", broken)
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_incomplete_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "junk.txt").write_text("x")
    with pytest.raises(LayerSkipError, match="no complete model"):
        ensure_standin(tmp_path / "m")
