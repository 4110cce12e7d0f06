"""Reading, tokenising, packing and splitting training data."""
import json

import pytest
import torch

from training_helpers import byte_tokenizer
from layerskip.errors import LayerSkipError
from layerskip.training.data import build_datasets, documents, pack, tokenize


def test_directory_is_read_recursively_skipping_hidden_and_binary(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("print('x')\n")
    (tmp_path / "b.txt").write_text("hello\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("secret")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"\x00\x01")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(documents([str(tmp_path)])) == ["print('x')\n", "hello\n", "from jsonl", "two"]


def test_glob_file_and_jsonl_field(tmp_path):
    (tmp_path / "m.py").write_text("a = 1\n")
    (tmp_path / "n.py").write_text("b = 2\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    assert list(documents([str(tmp_path / "*.py")])) == ["a = 1\n", "b = 2\n"]
    assert list(documents([str(tmp_path / "notes.md")])) == ["# notes\n"]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "c1"}) + "\n")
    assert list(documents([str(f)], text_field="content")) == ["c1"]


def test_tokenize_wraps_documents_with_bos_eos_and_packs_blocks():
    tok = byte_tokenizer()
    ids = tokenize(iter(["ab", "   ", "c"]), tok)  # the blank document is skipped
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a, b, c = (tok.convert_tokens_to_ids(ch) for ch in "abc")
    assert ids.tolist() == [bos, a, b, eos, bos, c, eos]
    blocks = pack(ids, 3)
    assert blocks.tolist() == [[bos, a, b], [eos, bos, c]]  # the last partial block is dropped


def test_held_out_split_is_disjoint_seeded_and_sized(tiny_data):
    tok = byte_tokenizer()
    train, held = build_datasets([str(tiny_data)], tok, seq_len=16, eval_fraction=0.1, seed=3)
    n = len(train) + len(held)
    assert len(held) == max(1, int(n * 0.1))
    everything = pack(tokenize(documents([str(tiny_data)]), tok), 16)
    union = torch.cat([train.blocks, held.blocks])  # a partition of all the blocks, nothing twice
    assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, everything.tolist()))
    again, _ = build_datasets([str(tiny_data)], tok, seq_len=16, eval_fraction=0.1, seed=3)
    assert torch.equal(train.blocks, again.blocks)
    assert train[0]["input_ids"].dtype == torch.int64 and train[0]["input_ids"].shape == (16,)
    none_held = build_datasets([str(tiny_data)], tok, seq_len=16, eval_fraction=0.0)[1]
    assert none_held is None


@pytest.mark.parametrize("setup,message", [
    (lambda d: str(d / "missing.txt"), "no such file"),
    (lambda d: str(d / "missing_dir") + "/", "no such file"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "has no files"),
    (lambda d: (d / "e.txt").write_text("  \n") and str(d / "e.txt"), "empty"),
    (lambda d: (d / "bad.jsonl").write_text("{not json\n") and str(d / "bad.jsonl"), "bad.jsonl, line 1: malformed JSON"),
    (lambda d: (d / "nofield.jsonl").write_text('{"body": "x"}\n') and str(d / "nofield.jsonl"), "string field 'text'"),
    (lambda d: (d / "bin.dat").write_bytes(b"\x00\xff") and str(d / "bin.dat"), "not a UTF-8 text file"),
    (lambda d: str(d / "*.nothing"), "no file matches"),
    (lambda d: (d / "short.txt").write_text("hi") and str(d / "short.txt"), "fewer than one block"),
])
def test_bad_data_is_a_clear_error(tmp_path, setup, message):
    spec = setup(tmp_path)
    with pytest.raises(LayerSkipError, match=message):
        build_datasets([spec], byte_tokenizer(), seq_len=64)


def test_unknown_dataset_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LayerSkipError, match="cannot load it as a dataset"):
        list(documents(["no-such-dataset-xyz"]))
