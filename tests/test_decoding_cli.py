"""`layerskip generate` end to end, and every bad input: one line on stderr, exit 2, no traceback."""
import re
import subprocess
import sys

import pytest

import layerskip
from layerskip.cli import main
from layerskip.testing import make_random_model


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_text_then_stats(tiny_checkpoint, capsys):
    code, out, err = run_cli(["generate", "--model", str(tiny_checkpoint), "--prompt", "import os\n",
                              "--strategy", "self-speculative", "--exit-layer", "2", "--num-speculations", "3",
                              "--max-new-tokens", "12"], capsys)
    assert code == 0 and out.strip()
    assert "tokens/s" in err and "acceptance" in err


def test_generate_auto_prints_its_choices(tiny_checkpoint, capsys):
    code, out, err = run_cli(["generate", "--model", str(tiny_checkpoint), "--prompt", "import os\n",
                              "--strategy", "self-speculative", "--exit-layer", "auto", "--max-new-tokens", "12"],
                             capsys)
    assert code == 0 and out.strip()
    assert "exit layer auto" in err and "chose E " in err and "on average" in err
    with pytest.raises(SystemExit) as e:  # argparse: a usage line and the error, exit status 2
        main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--exit-layer", "soon"])
    assert e.value.code == 2 and "expected an integer or 'auto'" in capsys.readouterr().err


def test_stream_prints_the_same_text(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "class A:\n", "--max-new-tokens", "15",
            "--strategy", "self-speculative", "--exit-layer", "1"]
    _, plain, _ = run_cli(base, capsys)
    _, streamed, _ = run_cli(base + ["--stream"], capsys)
    assert streamed == plain


def test_prompt_from_stdin(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "layerskip", "generate", "--model", str(tiny_checkpoint),
                           "--max-new-tokens", "4"], input="x = 1\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[autoregressive | 4 tokens" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--strategy", "beam"], "unknown strategy"),
    (["--strategy", "early-exit", "--exit-layer", "0"], "exit_layer must be an integer >= 1"),
    (["--strategy", "self-speculative", "--exit-layer", "4"], "exit_layer must be an integer in [1, 3]"),
    (["--strategy", "self-speculative", "--num-speculations", "0"], "num_speculations must be"),
    (["--max-new-tokens", "-3"], "max_new_tokens must be"),
    (["--sample", "--temperature", "0"], "temperature must be a finite number > 0"),
    (["--sample", "--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["--max-new-tokens", "5000"], "exceeds the model's 512 positions"),
    (["--strategy", "self-speculative", "--confidence-threshold", "1"], "confidence_threshold must be a number in [0, 1)"),
    (["--strategy", "self-speculative", "--draft-vocab", "-2"], "draft_vocab must be None, an integer >= 0"),
    (["--strategy", "self-speculative", "--draft-vocab", "100"], "needs a model trained by `layerskip train`"),
    (["--compile", "--sample"], "compile=True decodes greedily"),
    (["--compile", "--strategy", "self-speculative", "--exit-layer", "auto"], "compile=True needs a fixed exit layer"),
    (["--compile", "--strategy", "self-speculative", "--exit-layer", "2", "--confidence-threshold", "0.5"],
     "the confidence threshold"),
])
def test_bad_options(tiny_checkpoint, capsys, args, message):
    code, out, err = run_cli(["generate", "--model", str(tiny_checkpoint), "--prompt", "x"] + args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("layerskip: error:") and message in err, err
    assert "Traceback" not in err


def test_missing_and_broken_model_directories(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"], capsys)
    assert code == 2 and "no config.json" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    code, _, err = run_cli(["generate", "--model", str(broken), "--prompt", "x"], capsys)
    assert code == 2 and err.startswith("layerskip: error: cannot load model") and err.count("\n") == 1


def test_unsupported_architecture(tmp_path, capsys):
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    model.save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "gpt2"), "--prompt", "x"], capsys)
    assert code == 2 and "unsupported architecture GPT2LMHeadModel" in err and "LlamaForCausalLM" in err


def test_api_errors(tiny_llama):
    with pytest.raises(layerskip.LayerSkipError, match="empty"):
        layerskip.generate(tiny_llama, [])
    import torch
    assert len(layerskip.generate(tiny_llama, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2)) == 2  # a batch
    with pytest.raises(layerskip.LayerSkipError, match="shape"):
        layerskip.generate(tiny_llama, torch.zeros(2, 3, 1, dtype=torch.long))
    with pytest.raises(layerskip.LayerSkipError, match="exit_layer"):
        layerskip.generate(tiny_llama, [1], strategy="early_exit", exit_layer=4)


def test_defaults_stored_with_the_model():
    model = make_random_model("llama", num_layers=6)
    model.config.layerskip = {"exit_layer": 2, "num_speculations": 5}
    out = layerskip.generate(model, [1, 2, 3], strategy="self_speculative", max_new_tokens=6)
    assert (out.stats.exit_layer, out.stats.num_speculations) == (2, 5)


def test_demo_runs_both_strategies_and_checks_they_agree(tiny_checkpoint, capsys):
    code, out, _ = run_cli(["demo", "--model", str(tiny_checkpoint), "--max-new-tokens", "10", "--repeats", "2",
                            "--threads", "1"], capsys)
    assert code == 0
    assert "[autoregressive | 10 tokens" in out and "[self-speculative | 10 tokens" in out
    assert "output identical" in out
    assert re.search(r"4-gram repetition of the completion: (0|1)\.\d\d ", out)
    # the default prompt is the packaged held-out one; of its lines the demo prints the last ones
    from layerskip.decoding.cli import DEMO_PROMPT_FILE, DEMO_PROMPT_LINES

    lines = DEMO_PROMPT_FILE.read_text().splitlines(keepends=True)
    assert len(lines) > DEMO_PROMPT_LINES
    assert f"[... {len(lines) - DEMO_PROMPT_LINES} earlier lines of the prompt]" in out
    assert "".join(lines[-DEMO_PROMPT_LINES:]) in out and lines[0] not in out


def test_demo_rejects_bad_repeats(tiny_checkpoint, capsys):
    code, _, err = run_cli(["demo", "--model", str(tiny_checkpoint), "--repeats", "0"], capsys)
    assert code == 2 and "--repeats must be >= 1" in err


def test_stop_flag_reads_backslash_n_as_newline(tiny_checkpoint, capsys):
    from layerskip.decoding.cli import _unescape

    assert _unescape(r"\ndef ") == "\ndef " and _unescape(r"a\tb") == "a\tb"
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "40"]
    _, free, _ = run_cli(base, capsys)
    text = free.rstrip("\n")
    if "\n" not in text:
        pytest.skip("this random model's output has no newline to stop at")
    _, cut, _ = run_cli(base + ["--stop", r"\n"], capsys)
    assert cut.rstrip("\n") == text[: text.index("\n")]
