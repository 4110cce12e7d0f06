"""Training data: read documents, tokenise, pack into blocks of seq_len tokens, hold out an eval split.

A data spec is one of:
  a text or code file          the whole file is one document
  a directory                  every UTF-8 text file under it, recursively (hidden paths, __pycache__ and
                               binary files skipped); *.jsonl files inside are read as JSONL
  a glob                       e.g. "src/**/*.py" (quote it): the matching files, as above
  a .jsonl file                one JSON object per line; the document is its `text_field` ("text")
  a `datasets` name            e.g. "wikitext:wikitext-2-raw-v1" (NAME[:CONFIG]; "hf:" forces this reading),
                               loaded with datasets.load_dataset(NAME, CONFIG, split=data_split)

Packing: each document becomes [bos] + tokens + [eos] (where the tokenizer has them); the documents are
concatenated and cut into blocks of seq_len tokens; the last partial block is dropped. Blocks are the
samples: no padding, every position is a next-token target. A seeded shuffle picks the held-out blocks.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

import torch

from layerskip import jsonl
from layerskip.errors import LayerSkipError

_PATH_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".json", ".rst", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs")
_SKIP_DIRS = {"__pycache__", "node_modules"}


class PackedDataset(torch.utils.data.Dataset):
    """Blocks of token ids, each sample {"input_ids": (seq_len,) int64}."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # (n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i].long()}


def build_datasets(
    specs: list[str],
    tokenizer,
    seq_len: int,
    eval_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, held-out) packed datasets; held-out is None when eval_fraction is 0 or there is one block."""
    ids = tokenize(documents(specs, text_field, split), tokenizer)
    blocks = pack(ids, seq_len)
    n = blocks.shape[0]
    n_eval = 0 if eval_fraction <= 0 or n < 2 else max(1, int(n * eval_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train = PackedDataset(blocks[order[n_eval:]])
    held_out = PackedDataset(blocks[order[:n_eval]]) if n_eval else None
    return train, held_out


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(N,) token ids -> (N // seq_len, seq_len) blocks."""
    n = ids.shape[0] // seq_len
    if n == 0:
        raise LayerSkipError(
            f"the data has {ids.shape[0]} tokens, fewer than one block of --seq-len {seq_len}; add data or lower --seq-len"
        )
    return ids[: n * seq_len].view(n, seq_len)


def tokenize(docs: Iterator[str], tokenizer, batch: int = 256) -> torch.Tensor:
    """All documents' token ids, concatenated with bos/eos around each: (N,) int32 (int64 for vocab >= 2^31)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    parts, pending, count = [], [], 0

    def flush():
        encoded = tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]
        for seq in encoded:
            parts.append(torch.tensor(bos + list(seq) + eos, dtype=torch.int64))
        pending.clear()

    for doc in docs:
        if doc.strip():
            pending.append(doc)
            count += 1
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    if count == 0:
        raise LayerSkipError("the data is empty: no non-blank documents found")
    return torch.cat(parts)


def documents(specs: list[str], text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The documents of every spec, in order."""
    for spec in specs:
        yield from _documents(spec, text_field, split)


def _documents(spec: str, text_field: str, split: str) -> Iterator[str]:
    if spec.startswith("hf:"):
        yield from _hf_documents(spec[3:], text_field, split)
        return
    path = Path(spec).expanduser()
    if path.is_file():
        yield from _file_documents(path, text_field, explicit=True)
    elif path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _skipped(p.relative_to(path))]
        if not files:
            raise LayerSkipError(f"--data {spec}: the directory has no files")
        found = False
        for f in files:
            for doc in _file_documents(f, text_field, explicit=False):
                found = True
                yield doc
        if not found:
            raise LayerSkipError(f"--data {spec}: no text files under that directory")
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if os.path.isfile(p)]
        if not files:
            raise LayerSkipError(f"--data {spec}: no file matches that pattern")
        for f in files:
            yield from _file_documents(f, text_field, explicit=False)
    elif spec.startswith((".", "/", "~")) or spec.lower().endswith(_PATH_SUFFIXES) or spec.count("/") > 1:
        raise LayerSkipError(f"--data {spec}: no such file or directory")
    else:
        yield from _hf_documents(spec, text_field, split)


def _skipped(rel: Path) -> bool:
    return any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts)


def _file_documents(path: Path, text_field: str, explicit: bool) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
        return
    raw = path.read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if explicit:
            raise LayerSkipError(f"--data {path}: not a UTF-8 text file") from None
        return  # a binary file inside a directory: skip it
    yield text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        for n, record in jsonl.iter_objects(path):
            if not isinstance(record.get(text_field), str):
                raise LayerSkipError(f"{path}, line {n}: expected an object with a string field {text_field!r}")
            yield record[text_field]
    except LayerSkipError as e:
        raise LayerSkipError(f"--data {e}") from None


def _hf_documents(spec: str, text_field: str, split: str) -> Iterator[str]:
    """A Hugging Face `datasets` dataset, NAME or NAME:CONFIG."""
    try:
        import datasets
    except ImportError:
        raise LayerSkipError(f"--data {spec}: not a local path, and the `datasets` package is not installed") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, unknown name, bad split: all the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerSkipError(f"--data {spec}: not a local path, and cannot load it as a dataset ({first})") from None
    if text_field not in ds.column_names:
        raise LayerSkipError(f"--data {spec}: no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    for record in ds:
        if isinstance(record[text_field], str):
            yield record[text_field]
