"""Fixtures for the evaluation tests: a tiny byte-level tokenizer and tiny models that use it."""
import json

import pytest
import torch

from layerskip.testing import make_exact_from, make_random_model

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Article: The cat sat on the mat.\nSummary: A cat sat.",
    "Utterance: set an alarm for 7am\nParse: [IN:CREATE_ALARM [SL:DATE_TIME for 7am ] ]",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and two threads spin badly on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained in-process: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _model(tokenizer, *, num_layers=4, seed=0, exact_from=None):
    model = make_random_model("llama", num_layers=num_layers, hidden_size=64, num_heads=4, num_kv_heads=2,
                              vocab_size=len(tokenizer), seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if exact_from is not None:  # layers >= exact_from leave the residual stream unchanged
        make_exact_from(model, exact_from)
    return model


@pytest.fixture(scope="session")
def tiny(tokenizer):
    """A random 4-layer Llama over the fixture tokenizer."""
    return _model(tokenizer)


@pytest.fixture(scope="session")
def tiny_exact(tokenizer):
    """A 4-layer Llama whose layers >= 2 are identities: every draft from E=2 is accepted."""
    return _model(tokenizer, seed=1, exact_from=2)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path; rows are dicts, or raw strings written as lines as they are."""
    def write(name, rows):
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        return path
    return write
