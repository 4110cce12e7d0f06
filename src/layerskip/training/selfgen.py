"""On-policy data for self-distillation: the model's own greedy continuations of prompts cut from code.

Self-speculative decoding accepts a draft where exit E's argmax equals the last layer's, on the text the model
itself generates. Teacher-forced on human-written code, an early exit learns the last layer's prediction on text
the model would not have written; on the model's own greedy continuations it learns the predictions decoding
meets (DistillSpec, Zhou et al. 2023, makes the same point for separate draft models). `layerskip selfgen` writes
such a JSONL ({"text": prompt + continuation} per line); `layerskip train --data it --early-exit-targets final`
then trains the exits on it. On the greedy part the data's next token is the last layer's own argmax (that is
how greedy text is made), so the last layer's loss there mostly sharpens what it already predicts.

Prompts, cut from each document (a code file), in one of two shapes (`SHAPES`):
  def        each function's `def` line and the two lines after it;
  docstring  each function's `def` line and its docstring, ending at the closing quotes: the shape of a HumanEval
             prompt (stripped of trailing whitespace, as the benchmark strips it), whose greedy continuation is
             the function's body.
Either with up to 400 characters before it. (Prompts that end in a newline after the docstring teach the wrong
thing: byte-level BPE merges a newline with the next line's indentation, so a lone newline token is a boundary
the model rarely saw, greedy text there starts a new `def`, and training on it taught the model to close every
function at once.)
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable

import torch

from layerskip.errors import LayerSkipError
from layerskip.files import atomic_path

CONTEXT_CHARS = 400
SHAPES = {
    # the `def` line and two more lines
    "def": re.compile(r"(?m)^(    )?def \w+\(.*\n(?:.*\n){2}"),
    # a one-line `def` and its triple-quoted docstring (at most 1500 characters), up to the closing quotes
    "docstring": re.compile(r'(?m)^(    )?def \w+\(.*:\n[ \t]+[rRuU]?"""(?:(?!""")[\s\S]){0,1500}?"""'),
}


def context_prompts(text: str, context_chars: int = CONTEXT_CHARS, shape: str = "def") -> list[tuple[str, int]]:
    """(prompt, end offset in text) per function: its prompt of `shape` (SHAPES), `context_chars` before it."""
    if shape not in SHAPES:
        raise LayerSkipError(f"unknown prompt shape {shape!r}; choose from {', '.join(SHAPES)}")
    return [(text[max(0, m.start() - context_chars):m.end()], m.end()) for m in SHAPES[shape].finditer(text)]


def prompts_from(documents: Iterable[str], limit: int | None = None, seed: int = 0, shape: str = "def") -> list[str]:
    """Every function's prompt of `shape` in the documents, shuffled with `seed`, the first `limit` of them."""
    prompts = []
    for text in documents:
        prompts += [p for p, _ in context_prompts(text, shape=shape)]
    random.Random(seed).shuffle(prompts)
    return prompts[:limit] if limit is not None else prompts


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
                         max_prompt_tokens: int = 256, progress=None) -> Iterable[str]:
    """prompt + the model's greedy continuation (exactly max_new_tokens tokens, EOS not special), per prompt, in order.

    Batched with left padding through transformers' own `generate`; a prompt longer than `max_prompt_tokens` (or
    than the model's positions leave beside the continuation) keeps its last tokens.
    """
    max_prompt_tokens = prompt_budget(model, max_new_tokens, max_prompt_tokens)
    return _continuations(model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens, progress)


def prompt_budget(model, max_new_tokens: int, max_prompt_tokens: int = 256) -> int:
    """The most prompt tokens that fit beside `max_new_tokens` in the model's positions (LayerSkipError if none)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return max_prompt_tokens
    if max_new_tokens >= positions:
        raise LayerSkipError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{positions} positions")
    return min(max_prompt_tokens, positions - max_new_tokens)


def _continuations(model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens, progress):
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                max_length=max_prompt_tokens).to(model.device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=None)
                for prompt, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                    yield prompt + tokenizer.decode(row, skip_special_tokens=True)
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides


def write_jsonl(texts: Iterable[str], path: str | Path) -> int:
    """Write {"text": t} lines through a temp file beside `path`, then rename: no half-written file. Returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
            n += 1
    return n
