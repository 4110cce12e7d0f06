"""JSON Lines files: one JSON object per line, blank lines skipped, gzipped when the name ends in .gz.

Read by evaluation tasks (`jsonl:PATH`, `--data-file`) and by training data (`--data FILE.jsonl`).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from layerskip.errors import LayerSkipError


def iter_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) in file order, streaming (a corpus need not fit in memory).

    Raises:
        LayerSkipError: missing or unreadable file, or a line that is not a JSON object; the message names
            the file and the line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LayerSkipError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LayerSkipError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise LayerSkipError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise LayerSkipError(f"{path}: cannot read ({e})") from None
