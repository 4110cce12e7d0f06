"""Task loaders on small offline fixtures, and their clear errors."""
import gzip
import json

import pytest

from layerskip.errors import LayerSkipError
from layerskip.evaluation.metrics import humaneval_passed
from layerskip.evaluation.tasks import HUMANEVAL_STOP, load_task, read_jsonl


def test_custom_jsonl(write_jsonl):
    path = write_jsonl("custom.jsonl", [
        {"prompt": "2 + 2 =", "reference": " 4", "id": "sum"},
        "",  # blank lines are skipped
        {"prompt": "Say hi:", "response": " hi", "stop": ["\n"]},
        {"prompt": "No reference"},
    ])
    task = load_task(f"jsonl:{path}")
    assert task.name == f"jsonl:{path}"
    assert [s.id for s in task.samples] == ["sum", "3", "4"]  # default id: the line number
    assert task.samples[1].reference == " hi" and task.samples[1].stop_strings == ("\n",)
    assert task.samples[2].reference is None
    scores = task.score([" 4", " hello", "anything"])
    assert scores["exact_match"] == 0.5  # only samples with a reference are scored
    assert set(scores) == {"exact_match", "rouge1", "rouge2", "rougeL"}
    assert len(load_task(f"jsonl:{path}", limit=2).samples) == 2


def test_malformed_jsonl_names_the_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [{"prompt": "ok"}, "", '{"prompt": "broken",'])
    with pytest.raises(LayerSkipError, match=r"bad.jsonl, line 3: malformed JSON"):
        load_task(f"jsonl:{path}")
    path = write_jsonl("list.jsonl", [{"prompt": "ok"}, "[1, 2]"])
    with pytest.raises(LayerSkipError, match=r"line 2: expected a JSON object, got list"):
        read_jsonl(path)
    path = write_jsonl("field.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(LayerSkipError, match=r"line 2: missing field 'prompt'"):
        load_task(f"jsonl:{path}")
    path = write_jsonl("stop.jsonl", [{"prompt": "ok", "stop": [1]}])
    with pytest.raises(LayerSkipError, match=r"line 1: field 'stop'"):
        load_task(f"jsonl:{path}")


def test_empty_and_missing_data(write_jsonl, tmp_path):
    with pytest.raises(LayerSkipError, match="no samples"):
        load_task(f"jsonl:{write_jsonl('empty.jsonl', [])}")
    with pytest.raises(LayerSkipError, match="no samples"):
        load_task(f"jsonl:{write_jsonl('blank.jsonl', ['', '   '])}")
    with pytest.raises(LayerSkipError, match="no such file"):
        load_task(f"jsonl:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(LayerSkipError, match="needs a path"):
        load_task("jsonl:")


def test_unknown_task_and_bad_limit():
    with pytest.raises(LayerSkipError, match="unknown task 'gsm8k'; choose from humaneval, cnn_dm"):
        load_task("gsm8k")
    with pytest.raises(LayerSkipError, match="--limit must be >= 1"):
        load_task("humaneval", limit=0)


@pytest.mark.parametrize("task,row,prompt,reference,metric", [
    ("cnn_dm", {"article": "The cat sat.", "highlights": "Cat sat."}, "Article: The cat sat.\nSummary:",
     "Cat sat.", "rouge2"),
    ("xsum", {"document": "Rain fell.", "summary": "It rained."}, "Article: Rain fell.\nSummary:",
     "It rained.", "rougeL"),
    ("topv2", {"utterance": "wake me at 7", "semantic_parse": "[IN:CREATE_ALARM ]"},
     "Utterance: wake me at 7\nParse:", "[IN:CREATE_ALARM ]", "exact_match"),
    ("cnn_dm", {"prompt": "P:", "reference": "R"}, "P:", "R", "rouge1"),
])
def test_hub_tasks_from_data_file(write_jsonl, task, row, prompt, reference, metric):
    path = write_jsonl(f"{task}.jsonl", [row, row])
    t = load_task(task, data_file=str(path), limit=1)
    assert len(t.samples) == 1
    assert t.samples[0].prompt == prompt and t.samples[0].reference == reference
    assert t.samples[0].stop_strings  # each task stops its completions
    assert t.score([reference])[metric] == 1.0
    assert t.texts() == [prompt + reference]


def test_data_file_missing_fields(write_jsonl):
    path = write_jsonl("x.jsonl", [{"document": "text only"}])
    with pytest.raises(LayerSkipError, match=r"line 1: missing field 'summary'"):
        load_task("xsum", data_file=str(path))


def test_gzipped_data_file(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"utterance": "hi", "semantic_parse": "[IN:GREET ]"}) + "\n")
    assert load_task("topv2", data_file=str(path)).samples[0].reference == "[IN:GREET ]"


def test_offline_hub_task_points_to_data_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LayerSkipError) as err:
        load_task("xsum")
    message = str(err.value)
    assert "--data-file" in message and "\n" not in message and "offline" in message


def test_humaneval_ships_164_problems():
    task = load_task("humaneval")
    assert len(task.samples) == 164
    first = task.samples[0]
    assert first.id == "HumanEval/0" and first.prompt.startswith("from typing import List")
    assert first.stop_strings == HUMANEVAL_STOP == ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")
    assert {"test", "entry_point"} <= set(first.data)


def test_humaneval_checker_passes_canonical_and_fails_wrong():
    samples = load_task("humaneval", limit=2).samples
    problems = [s.data for s in samples]
    canonical = [s.data["canonical_solution"] for s in samples]
    wrong = ["    return None\n", "    raise ValueError('no')\n"]
    assert humaneval_passed(problems, canonical) == [True, True]
    assert humaneval_passed(problems, wrong) == [False, False]
    task = load_task("humaneval", limit=2)
    assert task.score(canonical) == {"pass@1": 1.0}
    assert task.score([canonical[0], wrong[1]]) == {"pass@1": 0.5}


def test_humaneval_from_data_file(write_jsonl):
    problem = {"task_id": "Mini/0", "prompt": "def one():\n", "canonical_solution": "    return 1\n",
               "test": "def check(f):\n    assert f() == 1\n", "entry_point": "one"}
    task = load_task("humaneval", data_file=str(write_jsonl("he.jsonl", [problem])))
    assert task.samples[0].id == "Mini/0"
    assert task.score(["    return 1\n"]) == {"pass@1": 1.0}
    bad = write_jsonl("he_bad.jsonl", [{"task_id": "x", "prompt": "p"}])
    with pytest.raises(LayerSkipError, match="line 1: missing field 'test'"):
        load_task("humaneval", data_file=str(bad))
