"""The (E, d) sweep: rows, heatmap, best pair, and resume after an interruption."""
import csv

import pytest

from layerskip.errors import LayerSkipError
from layerskip.evaluation.sweep import FIELDS, parse_int_list, run_sweep
from layerskip.evaluation.tasks import load_task


@pytest.fixture
def task(write_jsonl):
    rows = [{"prompt": "def add(a, b):"}, {"prompt": "The quick brown"}]
    return load_task(f"jsonl:{write_jsonl('p.jsonl', rows)}")


def test_parse_int_list():
    assert parse_int_list("4,2,2", "--x") == [2, 4]
    assert parse_int_list("2:8:2", "--x") == [2, 4, 6, 8]  # the end is included
    assert parse_int_list("1:3", "--x") == [1, 2, 3]
    for bad in ("a,b", "1:2:0", "5:1", "1:2:3:4", ""):
        with pytest.raises(LayerSkipError, match="--x"):
            parse_int_list(bad, "--x")


class Interrupt(Exception):
    pass


def test_sweep_resumes_without_duplicates(tiny_exact, tokenizer, task, tmp_path):
    out = tmp_path / "sweep"
    seen = []

    def stop_after_two(row):
        seen.append(row)
        if len(seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sweep(tiny_exact, tokenizer, task, [1, 2], [1, 3], out, max_new_tokens=6, predict=False,
                  progress=False, on_row=stop_after_two)
    first = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["exit_layer"], r["num_speculations"]) for r in first] == [("1", "1"), ("1", "3")]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind

    result = run_sweep(tiny_exact, tokenizer, task, [1, 2], [1, 3], out, max_new_tokens=6, predict=False,
                       progress=False)
    assert result.measured == 2
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert list(rows[0]) == FIELDS
    assert [(r["exit_layer"], r["num_speculations"]) for r in rows] == [("1", "1"), ("1", "3"), ("2", "1"), ("2", "3")]
    assert rows[:2] == first  # resumed rows are kept as measured, not redone
    assert all(r["match_rate"] == "1" for r in rows)  # lossless at every (E, d)
    assert [r["acceptance_rate"] for r in rows[2:]] == ["1", "1"]  # layers >= 2 are identities
    assert result.best == max(result.rows, key=lambda r: r["speedup"])
    assert result.png_path.read_bytes()[:4] == b"\x89PNG"

    again = run_sweep(tiny_exact, tokenizer, task, [1, 2], [1, 3], out, max_new_tokens=6, predict=False,
                      progress=False)
    assert again.measured == 0 and len(again.rows) == 4


def test_sweep_refuses_other_settings_and_bad_values(tiny_exact, tokenizer, task, tmp_path):
    out = tmp_path / "s"
    run_sweep(tiny_exact, tokenizer, task, [2], [2], out, max_new_tokens=4, predict=False, progress=False)
    with pytest.raises(LayerSkipError, match="other settings.*max_new_tokens: 4 -> 5"):
        run_sweep(tiny_exact, tokenizer, task, [2], [2], out, max_new_tokens=5, predict=False, progress=False)
    with pytest.raises(LayerSkipError, match=r"--exit-layers \[4\]: each must be in \[1, 3\]"):
        run_sweep(tiny_exact, tokenizer, task, [2, 4], [2], tmp_path / "t", progress=False)
    with pytest.raises(LayerSkipError, match="--num-speculations"):
        run_sweep(tiny_exact, tokenizer, task, [2], [0], tmp_path / "t", progress=False)
