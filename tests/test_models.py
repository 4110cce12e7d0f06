"""models.resolve / models.load: each source, every check made before weights are read, one-line errors for
broken checkpoints (in Python and through `layerskip generate`), and the draft vocabulary file."""
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import layerskip
from layerskip import models, smollm2
from layerskip.cli import main
from layerskip.errors import LayerSkipError
from layerskip.testing import make_random_model

SRC = Path(layerskip.__file__).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny random Llama checkpoint (no tokenizer), to be copied and damaged per test."""
    out = tmp_path_factory.mktemp("saved")
    make_random_model("llama", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64).save_pretrained(out)
    return out


@pytest.fixture
def checkpoint(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture
def gpt2_checkpoint(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def load_error(*args, **kwargs) -> str:
    with pytest.raises(LayerSkipError) as info:
        models.load(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_error(capsys, model_dir, *extra) -> str:
    code = main(["generate", "--model", str(model_dir), "--prompt", "x", *extra])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("layerskip: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ---- sources ----

def test_default_spec_is_the_packaged_model():
    assert models.resolve(None) == models.resolve("default") == models.default_model_dir()
    assert models.default_model_dir() == SRC / "assets" / "default-model"


def test_missing_packaged_model_says_the_installation_is_broken(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_PACKAGED_DEFAULT", tmp_path / "default-model")
    with pytest.raises(LayerSkipError, match="installation is broken"):
        models.resolve(None)
    assert list(tmp_path.iterdir()) == []  # nothing is built in its place


@pytest.mark.parametrize("spec", ["smollm2", "smollm2-135m", "SmolLM2-135M"])
def test_smollm2_spec_goes_to_the_converter_in_the_cache(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "ensure_smollm2", lambda target: Path(target))
    assert models.resolve(spec) == tmp_path / "smollm2-135m"


def test_local_directory_and_hub_id(checkpoint, tmp_path):
    assert models.resolve(str(checkpoint)) == checkpoint
    assert models.resolve("org/name") == "org/name"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LayerSkipError, match="not a directory"):
        models.resolve(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerSkipError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(LayerSkipError, match="no such directory"):
        models.resolve(str(tmp_path / "missing"))


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_sources_form_no_import_cycle():
    """models imports its sources; a source (smollm2) imports neither models nor a stand-in, which is gone."""
    assert not {"layerskip.models", "layerskip.standin"} & _imports(SRC / "smollm2.py")
    assert "layerskip.standin" not in _imports(SRC / "models.py")
    assert not (SRC / "standin.py").exists()


def test_no_package_module_imports_the_test_helpers():
    """Random models are for tests, benchmarks and scripts, never for the package itself."""
    for path in SRC.rglob("*.py"):
        if path.name != "testing.py":
            assert not any(n.startswith("layerskip.testing") for n in _imports(path)), path
    assert not hasattr(models, "make_random_model")


# ---- damaged weights ----

def test_truncated_weights(checkpoint, capsys):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert load_error(str(checkpoint)).startswith(f"cannot load model {checkpoint}: ")
    assert "cannot load model" in cli_error(capsys, checkpoint)


def test_garbage_weights(checkpoint, capsys):
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    assert load_error(str(checkpoint)).startswith("cannot load model")
    assert "cannot load model" in cli_error(capsys, checkpoint)


def test_missing_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    assert load_error(str(checkpoint)).startswith("cannot load model")


def test_corrupt_config(checkpoint, capsys):
    (checkpoint / "config.json").write_text("{not json")
    assert load_error(str(checkpoint)).startswith("cannot load model")
    assert "cannot load model" in cli_error(capsys, checkpoint)


# ---- device and dtype, checked first ----

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(checkpoint, capsys):
    assert "cuda is not available" in load_error(str(checkpoint), device="cuda")
    assert "cuda is not available" in cli_error(capsys, checkpoint, "--device", "cuda")


def test_device_index_out_of_range(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "no such device" in load_error(str(checkpoint), device="cuda:3")


def test_nonsense_device(checkpoint, capsys):
    assert "not a device name" in load_error(str(checkpoint), device="nonsense")
    assert "not a device name" in cli_error(capsys, checkpoint, "--device", "nonsense")


def test_device_is_checked_before_the_spec_is_resolved(tmp_path):
    assert "not a device name" in load_error(str(tmp_path / "missing"), device="nonsense")


@pytest.mark.parametrize("dtype", ["nn", "float", "int8", torch.int8, 3])
def test_bad_dtype_lists_the_choices(checkpoint, dtype):
    assert "must be one of float32, float16, bfloat16, auto" in load_error(str(checkpoint), dtype=dtype)


def test_bad_dtype_on_the_command_line(checkpoint, capsys):
    assert "must be one of float32, float16, bfloat16, auto" in cli_error(capsys, checkpoint, "--dtype", "nn")


@pytest.mark.parametrize("dtype,expected", [(None, torch.float32), ("bfloat16", torch.bfloat16),
                                            ("float16", torch.float16), (torch.float64, torch.float64)])
def test_good_dtypes(checkpoint, dtype, expected):
    model, tokenizer = models.load(str(checkpoint), dtype=dtype, device="cpu")
    assert model.dtype == expected and not model.training and tokenizer is None


# ---- architecture, checked from config.json before the weights ----

def test_unsupported_architecture_is_rejected_before_reading_weights(gpt2_checkpoint, capsys):
    message = load_error(str(gpt2_checkpoint))
    assert message.startswith("unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM")
    (gpt2_checkpoint / "model.safetensors").write_bytes(b"garbage")  # never read: same error
    assert load_error(str(gpt2_checkpoint)) == message
    assert "unsupported architecture GPT2LMHeadModel" in cli_error(capsys, gpt2_checkpoint)


def test_supported_architectures_are_re_exported():
    from layerskip import architectures

    assert layerskip.SUPPORTED_ARCHITECTURES == models.SUPPORTED_ARCHITECTURES == architectures.SUPPORTED_ARCHITECTURES


# ---- the draft vocabulary ----

def _set_inline(checkpoint, layerskip_dict):
    config = json.loads((checkpoint / "config.json").read_text())
    config["layerskip"] = layerskip_dict
    (checkpoint / "config.json").write_text(json.dumps(config))


def test_draft_vocab_file(checkpoint):
    (checkpoint / "draft_vocab.json").write_text(json.dumps({"ids": [5, 3, 9]}))
    model, _ = models.load(str(checkpoint))
    assert model.draft_vocab_ids == [5, 3, 9]


def test_no_draft_vocab(checkpoint):
    model, _ = models.load(str(checkpoint))
    assert model.draft_vocab_ids is None


def test_inline_draft_vocab_of_older_checkpoints(checkpoint):
    _set_inline(checkpoint, {"exit_layer": 1, "draft_vocab": [7, 2]})
    model, _ = models.load(str(checkpoint))
    assert model.draft_vocab_ids == [7, 2]
    assert model.config.layerskip == {"exit_layer": 1}  # one place to read it from: the attribute


def test_the_file_wins_over_an_inline_list(checkpoint):
    _set_inline(checkpoint, {"draft_vocab": [7, 2]})
    (checkpoint / "draft_vocab.json").write_text(json.dumps({"ids": [1]}))
    model, _ = models.load(str(checkpoint))
    assert model.draft_vocab_ids == [1] and model.config.layerskip == {}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"ids": 3}', '{"ids": [1, "a"]}', '{"ids": [true]}',
                                  '{"ids": [64]}', '{"ids": [-1]}', '{"ids": [1, 1]}'])
def test_malformed_draft_vocab_names_the_file(checkpoint, text):
    (checkpoint / "draft_vocab.json").write_text(text)
    assert str(checkpoint / "draft_vocab.json") in load_error(str(checkpoint))


def test_built_in_model_keeps_its_draft_vocab_in_a_file():
    config = json.loads((models.default_model_dir() / "config.json").read_text())
    assert not any(isinstance(v, list) for v in config["layerskip"].values())
    assert config["layerskip"]["exit_layer"] == 3  # the other stored settings stay in config.json
    model, tokenizer = models.load()
    ids = model.draft_vocab_ids
    assert isinstance(ids, list) and len(ids) == len(set(ids)) == 1024
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert "draft_vocab" not in model.config.layerskip
