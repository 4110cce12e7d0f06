"""Helpers shared by the training tests (a module with its own name: `conftest` is ambiguous on sys.path)."""
from layerskip.testing import make_random_model


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad> (ids 256-258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny(path, num_layers=4, arch="llama", **kw):
    model = make_random_model(arch, num_layers=num_layers, hidden_size=32, num_heads=4, num_kv_heads=2,
                              vocab_size=260, max_position_embeddings=64, seed=0, **kw)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)\n"
)
