"""`layerskip bench / sweep / analyze` end to end on a tiny checkpoint, and their one-line errors."""
import csv
import json
import subprocess
import sys

import pytest

from layerskip.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_exact, tokenizer):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_exact.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, tiny, tokenizer):
    path = tmp_path_factory.mktemp("other")
    tiny.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def prompts(write_jsonl):
    return write_jsonl("prompts.jsonl", [{"prompt": "def add(a, b):", "reference": " return a + b"},
                                         {"prompt": "The quick brown fox", "reference": " jumps"}])


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_cli_writes_json(capsys, model_dir, prompts, tmp_path):
    out_json = tmp_path / "deep" / "b.json"
    code, out, err = run(capsys, "bench", "--model", model_dir, "--task", f"jsonl:{prompts}", "--max-new-tokens", "8",
                         "--exit-layer", "2", "--num-speculations", "3", "--compare-transformers",
                         "--json", str(out_json), "--threads", "1")
    assert code == 0, err
    assert "self-speculative" in out and "transformers-early-exit" in out and "rouge2" in out
    doc = json.loads(out_json.read_text())
    assert doc["model"] == model_dir and doc["num_samples"] == 2
    assert [r["strategy"] for r in doc["results"]] == ["autoregressive", "early_exit", "self_speculative",
                                                       "transformers_greedy", "transformers_early_exit"]
    keys = {"strategy", "exit_layer", "num_speculations", "tokens_per_second", "ms_per_token", "speedup",
            "acceptance_rate", "match_rate", "metrics", "predicted_speedup"}
    assert all(keys <= set(r) for r in doc["results"])
    assert all(r["match_rate"] == 1.0 for r in doc["results"])  # exact draft model: all identical
    assert doc["results"][2]["acceptance_rate"] == 1.0
    assert doc["machine"]["torch_threads"] == 1


def test_bench_cli_auto_plots_its_choices(capsys, model_dir, prompts, tmp_path):
    png = tmp_path / "choices.png"
    code, out, err = run(capsys, "bench", "--model", model_dir, "--task", f"jsonl:{prompts}", "--max-new-tokens", "8",
                         "--strategies", "self-speculative", "--exit-layer", "auto", "--choices-plot", str(png),
                         "--no-metrics", "--threads", "1")
    assert code == 0, err
    assert "self-speculative chose: E " in out and png.stat().st_size > 1000
    code, out, err = run(capsys, "bench", "--model", model_dir, "--task", f"jsonl:{prompts}", "--choices-plot",
                         str(png), "--exit-layer", "2")
    assert code != 0 and "--choices-plot needs --exit-layer auto" in err


def test_sweep_cli(capsys, model_dir, prompts, tmp_path):
    args = ["sweep", "--model", model_dir, "--task", f"jsonl:{prompts}", "--exit-layers", "1:2",
            "--num-speculations", "2,4", "--max-new-tokens", "6", "--out", str(tmp_path / "sw")]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "best: exit_layer=" in out
    assert len(list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))) == 4
    assert (tmp_path / "sw" / "sweep.png").exists()
    code, out, err = run(capsys, *args)
    assert code == 0 and "resumed: 4 (E, d) pairs" in out


def test_sweep_replay_cli_agrees_with_the_timed_sweep(capsys, model_dir, prompts, tmp_path):
    common = ["--model", model_dir, "--task", f"jsonl:{prompts}", "--exit-layers", "1:2", "--num-speculations",
              "2,4", "--max-new-tokens", "6", "--confidence-threshold", "0"]
    code, out, err = run(capsys, "sweep", *common, "--out", str(tmp_path / "sw"))
    assert code == 0, err
    code, out, err = run(capsys, "sweep", *common, "--replay", "0,0.4", "--out", str(tmp_path / "re"))
    assert code == 0, err
    assert "best (predicted): exit_layer=" in out and "best with a flat verify pass" in out
    timed = {(r["exit_layer"], r["num_speculations"]): r for r in csv.DictReader(open(tmp_path / "sw" / "sweep.csv"))}
    assert (tmp_path / "re" / "replay.png").exists()
    replayed = list(csv.DictReader(open(tmp_path / "re" / "replay.csv")))
    assert len(replayed) == 8  # 2 E x 2 d x 2 thresholds
    for r in replayed:
        if float(r["confidence_threshold"]) == 0:  # the same rounds as the real decodes
            t = timed[(r["exit_layer"], r["num_speculations"])]
            assert float(r["tokens_per_round"]) == pytest.approx(float(t["tokens_per_round"]))
            assert float(r["acceptance_rate"]) == pytest.approx(float(t["acceptance_rate"]))
        if r["exit_layer"] == "2" and r["acceptance_rate"]:  # layers >= 2 are identities: every draft is right
            assert float(r["acceptance_rate"]) == 1.0


def test_analyze_cli_with_compare(capsys, model_dir, other_dir, prompts, tmp_path):
    code, out, err = run(capsys, "analyze", "--model", model_dir, "--compare", other_dir, "--task",
                         f"jsonl:{prompts}", "--out", str(tmp_path / "an"))
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "an" / "layers.csv")))
    assert {r["model"] for r in rows} == {model_dir, other_dir} and len(rows) == 8
    assert (tmp_path / "an" / "layers.png").exists()
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.")
    code, out, err = run(capsys, "analyze", "--model", model_dir, "--data", str(text), "--out", str(tmp_path / "a2"))
    assert code == 0, err


def errors(write_jsonl, tmp_path, model_dir):
    bad = write_jsonl("bad.jsonl", [{"prompt": "fine"}, "{not json"])
    empty = write_jsonl("empty.jsonl", [])
    return [
        (["bench", "--task", "nope"], "unknown task 'nope'"),
        (["bench", "--task", f"jsonl:{bad}"], "bad.jsonl, line 2: malformed JSON"),
        (["bench", "--task", f"jsonl:{empty}"], "no samples"),
        (["bench", "--task", "humaneval", "--limit", "0"], "--limit must be >= 1"),
        (["bench", "--strategies", "beam"], "unknown strategy 'beam'"),
        (["bench", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["bench", "--confidence-threshold", "-0.5"], "confidence_threshold must be a number in [0, 1)"),
        (["sweep", "--exit-layers", "1", "--num-speculations", "2", "--draft-vocab", "-1", "--out", str(tmp_path)],
         "draft_vocab must be None, an integer >= 0"),
        (["bench", "--model", model_dir, "--task", "humaneval", "--limit", "1", "--exit-layer", "9"],
         "exit_layer must be an integer in [1, 3]"),
        (["bench", "--model", str(tmp_path / "missing"), "--task", "humaneval", "--limit", "1"], "no such directory"),
        (["sweep", "--exit-layers", "x", "--num-speculations", "2", "--out", str(tmp_path)], "--exit-layers 'x'"),
        (["sweep", "--model", model_dir, "--task", "humaneval", "--limit", "1", "--exit-layers", "1,5",
          "--num-speculations", "2", "--out", str(tmp_path / "o")], "--exit-layers [5]"),
        (["analyze", "--data", str(empty), "--out", str(tmp_path / "a")], "no samples"),
        (["sweep", "--model", model_dir, "--task", "humaneval", "--limit", "1", "--exit-layers", "1", "--num-speculations",
          "0,2", "--replay", "--out", str(tmp_path / "r")], "each value must be >= 1"),
        (["sweep", "--exit-layers", "1", "--num-speculations", "2", "--replay", "x", "--out", str(tmp_path)],
         "--replay 'x': expected numbers"),
        (["sweep", "--exit-layers", "1", "--num-speculations", "2", "--replay", "0,1.5", "--out", str(tmp_path)],
         "each threshold must be in"),
        (["analyze", "--task", "xsum", "--out", str(tmp_path / "a")], "--data-file"),
    ]


def test_cli_errors_are_one_line(capsys, write_jsonl, tmp_path, model_dir, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    for argv, message in errors(write_jsonl, tmp_path, model_dir):
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        # (model loading may draw a progress bar above it)
        lines = [line for line in err.splitlines() if "layerskip" in line]
        assert len(lines) == 1 and lines[0].startswith("layerskip: error: "), (argv, err)
        assert err.endswith(lines[0] + "\n") and message in lines[0], (argv, err)
        assert "Traceback" not in err


def test_cli_error_in_a_real_process(write_jsonl):
    bad = write_jsonl("bad.jsonl", ['{"prompt": 1'])
    proc = subprocess.run([sys.executable, "-m", "layerskip", "bench", "--task", f"jsonl:{bad}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"layerskip: error: {bad}, line 1: malformed JSON "
                                                "(Expecting ',' delimiter)"]
