"""The draft vocabulary: the tokens a self-speculative draft step may propose.

A draft step at exit E pays for layers [0, E) and for the LM head. With a large vocabulary the head is
a big share of that (SmolLM2-135M: 49152 x 576, 21% of the weights). Drafting over only the tokens that
cover most of the training text (a few thousand ids) makes each draft step cheaper, and it stays
lossless: the verifier always scores the full vocabulary, so a token outside the draft vocabulary is
simply never drafted (the verifier emits it itself).

Where it comes from: `layerskip train` counts the token ids of its training data and stores the most
frequent ones, enough to cover COVERAGE of the training tokens, beside the weights in draft_vocab.json:
{"ids": [ids, most frequent first]} (`write` / `read`; config.json keeps small settings only). The model
loader attaches the list as `model.draft_vocab_ids`. `generate(draft_vocab=...)` picks:
  None   the stored list if the model has one, else the full vocabulary;
  0      the full vocabulary;
  N > 0  the N most frequent stored ids (or all stored, if fewer);
  a list of token ids, as given.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from layerskip.errors import LayerSkipError
from layerskip.files import write_json

COVERAGE = 0.99  # share of the training tokens the stored draft vocabulary covers
FILE_NAME = "draft_vocab.json"  # beside the weights: {"ids": [token ids, most frequent first]}


def write(directory: str | os.PathLike, ids) -> Path:
    """Store the draft vocabulary `ids` (most frequent first) as `directory`/draft_vocab.json, atomically.

    Returns:
        The file written.
    """
    path = Path(directory) / FILE_NAME
    write_json(path, {"ids": [int(i) for i in ids]})
    return path


def read(directory: str | os.PathLike) -> list[int] | None:
    """The draft vocabulary stored in `directory`/draft_vocab.json, or None if there is no such file.

    Raises:
        LayerSkipError naming the file if it is not a JSON object with an "ids" list of non-negative integers.
    """
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerSkipError(f"{path}: cannot read the draft vocabulary ({str(e).splitlines()[0]})") from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise LayerSkipError(f'{path}: expected {{"ids": [token ids]}}, a list of non-negative integers')
    return ids


def rank_tokens(counts: torch.Tensor, coverage: float = COVERAGE) -> list[int]:
    """Token ids by falling count (ties: lower id first), as many as cover `coverage` of all counts.

    Args:
        counts: (V,) occurrences of each token id.
    """
    counts = counts.to(torch.float64).cpu()
    total = float(counts.sum())
    if total <= 0:
        return []
    order = torch.argsort(-counts, stable=True)  # stable: equal counts keep id order
    covered = counts[order].cumsum(0) / total
    n = int((covered < coverage).sum()) + 1  # the first prefix reaching `coverage`
    return [int(i) for i in order[:min(n, int((counts > 0).sum()))]]


def count_tokens(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) occurrences of each id in any-shaped integer tensor `ids`."""
    return torch.bincount(ids.reshape(-1).long(), minlength=vocab_size)[:vocab_size]


def resolve(stored: list[int] | None, draft_vocab, vocab_size: int, device) -> torch.Tensor | None:
    """The draft vocabulary as a sorted-by-rank LongTensor on `device`, or None for the full vocabulary."""
    if draft_vocab is None:
        ids = stored or None
    elif isinstance(draft_vocab, bool) or not isinstance(draft_vocab, (int, list, tuple, torch.Tensor)):
        raise LayerSkipError(f"draft_vocab must be None, an integer >= 0 or a list of token ids, got {draft_vocab!r}")
    elif isinstance(draft_vocab, int):
        if draft_vocab < 0:
            raise LayerSkipError(f"draft_vocab must be >= 0 (0 = the full vocabulary), got {draft_vocab}")
        if draft_vocab and not stored:
            raise LayerSkipError("draft_vocab=N needs a model trained by `layerskip train` (it stores the token "
                                 "ranking); pass a list of token ids instead, or 0 for the full vocabulary")
        ids = stored[:draft_vocab] if draft_vocab else None
    else:
        ids = [int(i) for i in draft_vocab]
        if not ids:
            raise LayerSkipError("draft_vocab is an empty list")
    if ids is None or len(ids) >= vocab_size:
        return None
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise LayerSkipError(f"draft_vocab holds ids outside [0, {vocab_size})")
    return torch.tensor(ids, dtype=torch.long, device=device)
