"""The offline Python-code corpus: the interpreter's own standard library, and installed third-party packages.

Every machine that runs layerskip has both, so training, tokenizer fitting and held-out evaluation need no
download. What is in the standard-library part (`stdlib_files`):

- every `*.py` file under `sysconfig.get_paths()["stdlib"]`, read as UTF-8 (files that do not decode are
  left out);
- minus test suites (any directory named `test`, `tests` or `idle_test`: `test/`, `idlelib/idle_test/`,
  `lib2to3/tests/`, `unittest/test/`, ...), installed third-party code (`site-packages`, `dist-packages`),
  and build leftovers (`__pycache__`, `config-3.x-*`);
- minus generated files that are data rather than code: `pydoc_data/` (the help text as one big dict),
  `_sysconfigdata_*.py` (build variables) and the codec tables written by `gencodec.py` in `encodings/`.

Split (deterministic, by top-level module, so no file of a held-out package leaks into training):
`HELDOUT_MODULES` below, about 5% of the corpus by size on CPython 3.11. A module missing from an
interpreter is simply absent from both splits. Files are listed in sorted relative-path order.

The third-party part (`third_party_files`) is the pure-Python code of packages installed beside layerskip (its
own dependencies and their dependencies: `THIRD_PARTY_TRAIN`, `THIRD_PARTY_HELDOUT`), all under permissive
licences (BSD, MIT, Apache-2.0, PSF); MPL-licensed packages (certifi, hypothesis, tqdm) are not used. Test suites,
vendored copies of other packages (`_vendor/`, `vendored/`, ...) and generated files (`*_pb2.py`) are left out, so
no held-out package's code reaches training through another package's copy of it.

Example:
    >>> from layerskip.corpus import stdlib_files, read_texts
    >>> texts = read_texts(stdlib_files("heldout"), max_chars=100_000)
"""
from __future__ import annotations

import functools
import re
import sysconfig
from pathlib import Path

from layerskip.errors import LayerSkipError

SPLITS = ("train", "heldout", "all")

# Top-level modules (a single file `name.py` or a package directory `name/`) kept out of training.
# Self-contained, idiomatic modules of various styles: parsing, numerics, text, data structures.
HELDOUT_MODULES = frozenset({
    "bisect", "calendar", "colorsys", "csv", "dataclasses", "difflib", "fnmatch", "fractions", "glob",
    "graphlib", "heapq", "ipaddress", "json", "pprint", "queue", "sched", "shlex", "statistics", "string",
    "textwrap",
})

_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                            "pydoc_data"})
_GENERATED_MARKER = "gencodec.py"  # header line of the generated codec tables in encodings/


# Installed packages (import names) whose code trains the built-in model. Big ones are capped per package by
# `third_party_files(max_chars_per_package=...)`, which samples files spread over the package.
THIRD_PARTY_TRAIN = (
    "absl", "accelerate", "anyio", "click", "cloudpickle", "contourpy", "cycler", "datasets", "defusedxml", "dill",
    "fastapi", "filelock", "fire", "fontTools", "fsspec", "gguf", "h11", "httpcore", "httpx", "huggingface_hub",
    "iniconfig", "jinja2", "joblib", "markdown_it", "markupsafe", "matplotlib", "mdurl", "mpl_toolkits", "mpmath",
    "multiprocess", "nltk", "numpy", "openai", "packaging", "pandas", "PIL", "pluggy", "prometheus_client", "psutil",
    "pydantic", "pygments", "_pytest", "requests", "rich", "rouge_score", "safetensors", "setuptools", "six",
    "sniffio", "starlette", "sympy", "termcolor", "tokenizers", "torch", "torchgen", "transformers", "typer",
    "typing_extensions", "urllib3", "uvicorn", "yaml",
)
# Kept out of training for evaluation on code the model never saw: idiomatic pure-Python libraries with many
# documented functions (graphs, sorted containers, dates, parsing, TOML, domain names).
THIRD_PARTY_HELDOUT = ("networkx", "sortedcontainers", "dateutil", "pyparsing", "tomlkit", "idna")

_VENDORED_DIRS = frozenset({"_vendor", "vendor", "_vendored", "vendored", "externals", "_externals", "extern",
                            "_extern", "testing", "_testing", "conftest"})
_GENERATED_NAME = re.compile(r"_pb2(_grpc)?\.py$")


def site_packages_root() -> Path:
    """The running interpreter's site-packages directory (a virtual environment's own, inside one)."""
    return Path(sysconfig.get_paths()["purelib"])


def third_party_files(split: str = "train", root: Path | str | None = None,
                      max_chars_per_package: int | None = None) -> list[Path]:
    """The installed third-party packages' code files of one split.

    Args:
        split: "train" (`THIRD_PARTY_TRAIN`), "heldout" (`THIRD_PARTY_HELDOUT`) or "all".
        root: the site-packages directory to scan; default: the running interpreter's.
        max_chars_per_package: a size budget per package, taken as files spread over it (`spread`); None: all.
    Returns:
        Absolute paths, package by package in the order of the tuples above, each sorted by relative path.
        Packages that are not installed are skipped.
    """
    if split not in SPLITS:
        raise LayerSkipError(f"unknown corpus split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(root) if root is not None else site_packages_root()
    if not root.is_dir():
        raise LayerSkipError(f"site-packages directory not found: {root}")
    names = {"train": THIRD_PARTY_TRAIN, "heldout": THIRD_PARTY_HELDOUT,
             "all": THIRD_PARTY_TRAIN + THIRD_PARTY_HELDOUT}[split]
    files: list[Path] = []
    for name in names:
        found = _package_files(root.resolve(), name)
        files += spread(found, max_chars_per_package) if max_chars_per_package is not None else found
    return files


def round_robin(files: list[Path]) -> list[Path]:
    """Site-packages files interleaved across their packages (first file of each, then the second, ...), so that
    any first part of the list (a token budget, a prompt count) covers every package."""
    from itertools import chain, zip_longest

    root, by_package = site_packages_root().resolve(), {}
    for path in files:
        by_package.setdefault(Path(path).resolve().relative_to(root).parts[0], []).append(path)
    return [p for p in chain.from_iterable(zip_longest(*by_package.values())) if p is not None]


def _package_files(root: Path, name: str) -> list[Path]:
    """Code files of one installed package (`name/` or `name.py` under `root`), sorted by relative path."""
    if (root / f"{name}.py").is_file():
        return [root / f"{name}.py"] if _is_code(root / f"{name}.py") else []
    found = []
    for path in (root / name).rglob("*.py") if (root / name).is_dir() else ():
        rel = path.relative_to(root)
        dirs = set(rel.parts[:-1])
        if (dirs & (_EXCLUDED_DIRS | _VENDORED_DIRS) or rel.name.startswith("test_") or rel.name == "conftest.py"
                or _GENERATED_NAME.search(rel.name) or not path.is_file() or not _is_code(path)):
            continue
        found.append((rel.as_posix(), path))
    return [path for _, path in sorted(found)]


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_of(rel: Path) -> str:
    """Top-level module a stdlib-relative path belongs to: `json/decoder.py` -> "json", `csv.py` -> "csv"."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def split_of(rel: Path) -> str:
    """"heldout" or "train" for a stdlib-relative path."""
    return "heldout" if module_of(rel) in HELDOUT_MODULES else "train"


def _excluded(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    return (
        any(d in _EXCLUDED_DIRS or d.startswith("config-") for d in dirs)
        or rel.name.startswith("_sysconfigdata_")
    )


def _is_code(path: Path) -> bool:
    """UTF-8 decodable, and not a generated codec table."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return _GENERATED_MARKER not in text[:2000]


@functools.lru_cache(maxsize=4)
def _corpus(root: Path) -> tuple[tuple[Path, str], ...]:
    """(absolute path, split) for every corpus file under `root`, sorted by relative path."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _excluded(rel) and path.is_file() and _is_code(path):
            found.append((rel, path))
    found.sort(key=lambda item: item[0].as_posix())
    return tuple((path, split_of(rel)) for rel, path in found)


def stdlib_files(split: str = "train", root: Path | str | None = None) -> list[Path]:
    """The corpus files of one split.

    Args:
        split: "train", "heldout" or "all".
        root: the stdlib directory to scan; default: the running interpreter's (`stdlib_root()`).
    Returns:
        Absolute paths, sorted by path relative to the root (the same order on every run).
    """
    if split not in SPLITS:
        raise LayerSkipError(f"unknown corpus split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise LayerSkipError(f"standard library directory not found: {root}")
    return [path for path, s in _corpus(root.resolve()) if split == "all" or s == split]


def read_texts(files, max_chars: int | None = None) -> list[str]:
    """Read files as UTF-8 text, in order.

    Args:
        files: paths (e.g. from `stdlib_files`).
        max_chars: a budget for the total number of characters returned: files are read in order until it
            is spent, and the last text is cut to fit. None reads everything.
    Returns:
        One string per file read (fewer than `files` when the budget runs out).
    """
    texts: list[str] = []
    left = max_chars
    for path in files:
        if left is not None and left <= 0:
            break
        text = Path(path).read_text(encoding="utf-8")
        if left is not None:
            text = text[:left]
            left -= len(text)
        texts.append(text)
    return texts


def spread(files: list[Path], max_chars: int) -> list[Path]:
    """An evenly spaced subset of `files` of about `max_chars` characters in all (by file size).

    Taking files spread over the whole sorted list, rather than the first ones, samples every part of
    the library instead of the alphabetically first packages. Deterministic.
    """
    total = sum(p.stat().st_size for p in files)
    if total <= max_chars:
        return list(files)
    frac = max(max_chars, 0) / total
    # file j is taken when the running count floor(j * frac) steps up: evenly spaced, about frac of them
    return [p for j, p in enumerate(files) if int((j + 1) * frac) > int(j * frac)]
