"""Train a byte-level BPE tokenizer for code and save it so `AutoTokenizer.from_pretrained` loads it.

Byte-level (GPT-2 style): text is mapped to bytes, so every string, whatever its characters, encodes and
decodes back exactly — spaces, tabs, newlines and indentation included. No prefix space is added, no
normalizer runs and decoding does not "clean up" spaces, so `decode(encode(s)) == s` for any `s`.

Special tokens: `<|endoftext|>` (id 0) is the end-of-sequence token and also serves as beginning-of-
sequence (documents are separated by it, as in GPT-2); `<|pad|>` (id 1) pads batches. Neither is added
automatically when encoding: data pipelines insert `<|endoftext|>` between documents themselves.

Example:
    >>> from layerskip.corpus import stdlib_files
    >>> tok = train_bpe_tokenizer(stdlib_files("train")[:50], vocab_size=1024, out_dir="/tmp/tok")
    >>> AutoTokenizer.from_pretrained("/tmp/tok").decode(tok("x = 1\\n").input_ids)
    'x = 1\\n'
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from layerskip.errors import LayerSkipError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1


def _texts(items: Iterable[str | os.PathLike]) -> Iterator[str]:
    """`str` items are texts; path objects are files read as UTF-8."""
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, os.PathLike):
            yield Path(item).read_text(encoding="utf-8")
        else:
            raise TypeError(f"expected str (a text) or a path, got {type(item).__name__}")


def train_bpe_tokenizer(
    texts_or_files: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
):
    """Train a byte-level BPE tokenizer and save it (tokenizer.json + tokenizer_config.json) in `out_dir`.

    Args:
        texts_or_files: training data; each `str` item is a text, each path object (`pathlib.Path`) a UTF-8
            file to read.
        vocab_size: size of the vocabulary, special tokens and the 256 byte tokens included.
        out_dir: directory to save into (created if needed).
        min_frequency: pairs seen fewer times than this are not merged.
        model_max_length: recorded in the tokenizer config (the model's context length); None: unset.
    Returns:
        The trained tokenizer, a transformers fast tokenizer (`PreTrainedTokenizerFast`), as
        `AutoTokenizer.from_pretrained(out_dir)` will load it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise LayerSkipError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (bytes + specials)")

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: " x" and "x" stay different, and nothing is inserted at the start of a text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_texts(texts_or_files), trainer=trainer)

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # would turn "a ." into "a." on decode
        add_prefix_space=False,
        **kwargs,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
