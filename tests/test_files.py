"""files.build_once: a directory appears complete or not at all, and is built once."""
import os

import pytest

from layerskip.errors import LayerSkipError
from layerskip.files import build_once


def _build(out):
    (out / "config.json").write_text("{}")
    (out / "weights.bin").write_bytes(b"\0" * 8)


def test_builds_into_place_and_leaves_no_temp_dir(tmp_path):
    assert build_once(tmp_path / "m", _build) == tmp_path / "m"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_second_call_does_not_build_again(tmp_path):
    build_once(tmp_path / "m", _build)
    before = (tmp_path / "m" / "weights.bin").stat().st_mtime_ns
    calls = []
    assert build_once(tmp_path / "m", calls.append) == tmp_path / "m"
    assert calls == []  # the build function is not called
    assert (tmp_path / "m" / "weights.bin").stat().st_mtime_ns == before


def test_an_empty_target_dir_is_replaced(tmp_path):
    (tmp_path / "m").mkdir()
    build_once(tmp_path / "m", _build)
    assert (tmp_path / "m" / "config.json").exists()


def test_failed_build_leaves_nothing(tmp_path):
    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "m", broken)
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_incomplete_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "junk.txt").write_text("x")
    with pytest.raises(LayerSkipError, match="no complete model"):
        build_once(tmp_path / "m", _build)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["junk.txt"]


def test_stale_temp_dirs_of_a_killed_build_are_removed(tmp_path):
    stale = tmp_path / ".m.tmp-old"
    stale.mkdir()
    os.utime(stale, (0, 0))
    fresh = tmp_path / ".m.tmp-running"  # another process building right now: left alone
    fresh.mkdir()
    build_once(tmp_path / "m", _build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.tmp-running", "m"]
