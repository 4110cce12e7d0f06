"""Atomic file output, written once for the whole package.

Every file this package writes (JSON, JSONL, CSV, PNG, a model directory) goes to a temporary file or
directory beside its target first and is then renamed over the target, so an interrupted run never leaves a
half-written file behind (a rename within one filesystem is atomic).

  atomic_path(path)      a temporary file path; renamed over `path` on success, removed on error
  write_text / write_json / write_csv / save_figure   on top of it
  atomic_dir(path)       the same for a whole directory (a model checkpoint), replacing any old one
  build_once(dir, build) a directory made once by `build(tmp)`, concurrent builders tolerated
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from layerskip.errors import LayerSkipError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    if path.is_dir():
        raise LayerSkipError(f"{path}: is a directory, expected a file name")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LayerSkipError(f"cannot create directory {parent}: {e.strerror or e}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fieldnames: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in fieldnames})
    write_text(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """`fig.savefig` through a temporary file (the format is taken from `path`'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (an existing directory is
    moved aside first and removed after: `path` is never missing for longer than two renames); on error the
    temporary directory is removed and `path` is left as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LayerSkipError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst` if it exists (two renames, then the old copy goes)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


_STALE_TEMP_S = 3600  # temp dirs older than this are leftovers of a killed build


def build_once(target_dir: Path, build: Callable[[Path], None], *, marker: str = "config.json") -> Path:
    """Create `target_dir` by calling `build(tmp_dir)`, then renaming tmp_dir into place; once.

    If `target_dir/marker` exists the directory is complete (it only ever appears by rename), and it is
    returned at once. The temporary directory sits beside `target_dir` (same filesystem, so the rename is
    atomic) and is removed if `build` fails. When two processes build at once, the first rename wins and
    the other's copy is discarded.
    """
    target_dir = Path(target_dir)
    if (target_dir / marker).exists():
        return target_dir
    if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
        raise LayerSkipError(f"{target_dir} exists but holds no complete model ({marker} missing); delete it and retry")
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target_dir.name}.tmp-"
    _remove_stale_temps(target_dir.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target_dir.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target_dir)  # atomic; also replaces an empty target_dir
        except OSError:
            if not (target_dir / marker).exists():
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target_dir


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    now = time.time()
    for old in parent.glob(prefix + "*"):
        try:
            if now - old.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
