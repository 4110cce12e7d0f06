"""The standard-library corpus: what is in it, the held-out split, reading with a budget."""
from pathlib import Path

import pytest

from layerskip.corpus import (
    HELDOUT_MODULES,
    module_of,
    read_texts,
    spread,
    stdlib_files,
    stdlib_root,
)
from layerskip.errors import LayerSkipError


@pytest.fixture(scope="module")
def splits():
    return {s: stdlib_files(s) for s in ("train", "heldout", "all")}


def rel(path):
    return path.relative_to(stdlib_root().resolve())


def size(files):
    return sum(p.stat().st_size for p in files)


def test_splits_partition_the_corpus(splits):
    train, heldout, all_ = map(set, (splits["train"], splits["heldout"], splits["all"]))
    assert train and heldout
    assert not train & heldout
    assert train | heldout == all_
    assert 0.02 < size(heldout) / size(all_) < 0.10  # "about 5%"


def test_heldout_is_whole_modules(splits):
    assert {module_of(rel(p)) for p in splits["heldout"]} <= HELDOUT_MODULES
    assert not {module_of(rel(p)) for p in splits["train"]} & HELDOUT_MODULES
    names = {rel(p).as_posix() for p in splits["heldout"]}
    assert "json/decoder.py" in names and "json/__init__.py" in names  # every file of a held-out package


def test_contents_are_code_not_tests_or_generated_data(splits):
    names = [rel(p).as_posix() for p in splits["all"]]
    assert "os.py" in names and "asyncio/tasks.py" in names and "idlelib/editor.py" in names
    for name in names:
        parts = name.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "pydoc_data"} & set(parts[:-1]), name
        assert not parts[-1].startswith("_sysconfigdata_"), name
    assert "encodings/cp1252.py" not in names  # generated codec table
    assert "encodings/utf_8.py" in names  # hand-written codec


def test_deterministic_sorted_order(splits):
    files = splits["all"]
    assert files == stdlib_files("all")
    keys = [rel(p).as_posix() for p in files]
    assert keys == sorted(keys)


def test_filters_on_a_made_up_library(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "site-packages" / "x").mkdir(parents=True)
    (tmp_path / "textwrap.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    pass\n")
    (tmp_path / "pkg" / "tests" / "test_mod.py").write_text("assert True\n")
    (tmp_path / "site-packages" / "x" / "y.py").write_text("y = 2\n")
    (tmp_path / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8
    (tmp_path / "cp.py").write_text('""" Python Character Mapping Codec generated from gencodec.py """\n')
    got = {s: [p.relative_to(tmp_path.resolve()).as_posix() for p in stdlib_files(s, root=tmp_path)]
           for s in ("train", "heldout")}
    assert got == {"train": ["pkg/mod.py"], "heldout": ["textwrap.py"]}


def test_read_texts_budget(splits):
    files = splits["heldout"][:5]
    full = read_texts(files)
    assert full == [p.read_text(encoding="utf-8") for p in files]
    budget = len(full[0]) + 10
    cut = read_texts(files, max_chars=budget)
    assert len(cut) == 2 and cut[0] == full[0] and cut[1] == full[1][:10]
    assert sum(map(len, cut)) == budget
    assert read_texts(files, max_chars=0) == []


def test_spread_samples_the_whole_list(splits):
    train = splits["train"]
    picked = spread(train, 2_000_000)
    assert set(picked) <= set(train) and picked == sorted(picked, key=train.index)
    assert 1_000_000 < size(picked) < 3_500_000
    assert train.index(picked[-1]) > 0.9 * len(train)  # reaches the end of the alphabet
    assert spread(train, 10**12) == train


def test_unknown_split():
    with pytest.raises(LayerSkipError, match="unknown corpus split"):
        stdlib_files("validation")
    with pytest.raises(LayerSkipError, match="not found"):
        stdlib_files("all", root=Path("/nonexistent/stdlib"))
