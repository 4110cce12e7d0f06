"""Fixtures for the training tests: a tiny saved checkpoint with a byte-level tokenizer, and tiny data."""
import pytest

from training_helpers import TEXT, save_tiny


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A 4-layer width-32 Llama checkpoint dir (vocab 260, 64 positions) with its tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture
def tiny_data(tmp_path):
    """A directory of small Python files: about 60 blocks of 16 tokens."""
    d = tmp_path / "data"
    (d / "pkg").mkdir(parents=True)
    for i in range(4):
        (d / "pkg" / f"m{i}.py").write_text(TEXT * (i + 1))
    return d


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: on a shared 2-core machine, OpenMP threads waiting on each other under
    load make tiny-model steps hundreds of times slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
