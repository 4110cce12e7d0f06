"""Byte-level BPE training: exact round trips on real code, special tokens, loadable by transformers."""
import pytest
from transformers import AutoTokenizer

from layerskip.corpus import read_texts, spread, stdlib_files
from layerskip.errors import LayerSkipError
from layerskip.tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

VOCAB = 1024


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    files = spread(stdlib_files("train"), 1_000_000)
    returned = train_bpe_tokenizer(files, VOCAB, out, model_max_length=2048)
    return out, returned, AutoTokenizer.from_pretrained(str(out))


def test_loadable_and_same_as_returned(trained):
    out, returned, loaded = trained
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert len(loaded) == VOCAB
    assert loaded.model_max_length == 2048
    text = "for i in range(10):\n    print(i)\n"
    assert loaded(text).input_ids == returned(text).input_ids


def test_round_trip_heldout_stdlib_exactly(trained):
    tok = trained[2]
    texts = read_texts(stdlib_files("heldout"))
    assert len(texts) > 10
    chars = tokens = 0
    for text in texts:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        chars, tokens = chars + len(text), tokens + len(ids)
    assert chars / tokens > 2.5  # merges were learned (bytes alone would be ~1 char per token)


@pytest.mark.parametrize("text", [
    "",
    " leading space and trailing spaces   ",
    "\tdef f(a , b) :\r\n\t\treturn a .b\n\n\n",
    "s = 'été — 中文 🙂 \\u00e9'\x00\x7f",
    "x  =  [ 1 ,2 ]  # don't clean up spaces ; ok ?",
])
def test_round_trip_whitespace_and_unicode(trained, text):
    tok = trained[2]
    assert tok.decode(tok(text).input_ids) == text


def test_special_tokens(trained):
    tok = trained[2]
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 0
    assert tok.bos_token == EOS_TOKEN and tok.bos_token_id == 0
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 1
    assert tok("x").input_ids == tok.convert_tokens_to_ids(["x"])  # nothing added around the text
    ids = tok(f"a{EOS_TOKEN}b").input_ids
    assert ids.count(0) == 1 and tok.decode(ids) == f"a{EOS_TOKEN}b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_texts_and_files_give_the_same_tokenizer(tmp_path):
    files = stdlib_files("heldout")[:8]
    a = train_bpe_tokenizer(files, 400, tmp_path / "a")
    b = train_bpe_tokenizer(read_texts(files), 400, tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()


def test_bad_arguments(tmp_path):
    with pytest.raises(LayerSkipError, match="vocab_size"):
        train_bpe_tokenizer(["x"], 100, tmp_path)
    with pytest.raises(TypeError):
        train_bpe_tokenizer([b"bytes"], 300, tmp_path)
