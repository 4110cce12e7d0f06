"""`layerskip selfgen`: prompts cut from code, and batched greedy continuations equal to one-by-one decoding."""
import json

import pytest

from layerskip import generate, models
from layerskip.cli import main
from layerskip.errors import LayerSkipError
from layerskip.training.selfgen import context_prompts, greedy_continuations, prompts_from

CODE = '''import os


@cache
def first(a, b):
    """Add them.

    Twice."""
    return a + b


def no_doc(x):
    return x


def only_doc():
    """Nothing after me."""


class K:
    def method(self, y):
        \'\'\'Scale y.\'\'\'
        z = y * 2
        return z
'''


def test_context_prompts_end_two_lines_after_each_def():
    prompts = context_prompts(CODE, context_chars=10)
    assert len(prompts) == 4  # first, no_doc, only_doc, method
    for prompt, end in prompts:
        assert CODE[:end].endswith(prompt) and len(prompt) <= end
        assert "def " in prompt and prompt.count("\n") >= 3


def test_docstring_prompts_end_at_each_closing_quotes():
    prompts = context_prompts(CODE, context_chars=10, shape="docstring")
    # first's two-line docstring and only_doc's one-liner; no_doc has none, method's uses single quotes
    assert [p[p.index("def "):] for p, _ in prompts] == [
        'def first(a, b):\n    """Add them.\n\n    Twice."""',
        'def only_doc():\n    """Nothing after me."""',
    ]
    for prompt, end in prompts:
        assert CODE[:end].endswith(prompt) and CODE[end] == "\n"  # a HumanEval prompt's shape: no trailing newline


def test_a_def_line_past_a_docstring_does_not_reach_into_the_next_function():
    code = 'def a():\n    return 1\n\n\ndef b():\n    """B."""\n'
    assert [p for p, _ in context_prompts(code, context_chars=0, shape="docstring")] == ['def b():\n    """B."""']


def test_unknown_prompt_shape_is_an_error():
    with pytest.raises(LayerSkipError, match="unknown prompt shape"):
        context_prompts(CODE, shape="class")


def test_prompts_from_shuffles_and_limits():
    docs = [CODE, CODE.replace("first", "second")]
    every = prompts_from(docs)
    assert sorted(every) == sorted(p for d in docs for p, _ in context_prompts(d))
    assert prompts_from(docs, limit=3) == every[:3]
    assert prompts_from(docs, seed=1) != every and sorted(prompts_from(docs, seed=1)) == sorted(every)
    docstrings = prompts_from(docs, shape="docstring")
    assert sorted(docstrings) == sorted(p for d in docs for p, _ in context_prompts(d, shape="docstring"))


def test_batched_continuations_equal_one_by_one_greedy(tiny_ckpt):
    model, tok = models.load(str(tiny_ckpt))
    prompts = ["def a(x):\n    ", "class Stack:\n    def push(self, x):\n", "x", "return a + b\n" * 2]
    got = list(greedy_continuations(model, tok, prompts, max_new_tokens=10, batch_size=3))
    for prompt, text in zip(prompts, got):
        ids = tok(prompt)["input_ids"]
        want = generate(model, ids, max_new_tokens=10, eos_token_id=[], tokenizer=tok)
        assert text == prompt + want.text


def test_selfgen_cli_writes_jsonl(tiny_ckpt, tiny_data, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    rc = main(["selfgen", "--model", str(tiny_ckpt), "--data", str(tiny_data), "--limit", "5",
               "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)])
    assert rc == 0 and "wrote 5 continuations" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all("def " in r["text"] for r in rows)
    assert not list(tmp_path.glob(".*tmp*"))


def test_selfgen_cli_docstring_prompts(tiny_ckpt, tmp_path):
    code = tmp_path / "code.py"
    code.write_text(CODE)
    out = tmp_path / "gen.jsonl"
    rc = main(["selfgen", "--model", str(tiny_ckpt), "--data", str(code), "--prompt-shape", "docstring",
               "--max-new-tokens", "6", "--out", str(out)])
    rows = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert rc == 0 and len(rows) == 2  # first and only_doc: the functions with a docstring
    prompts = [p for p, _ in context_prompts(CODE, shape="docstring")]
    assert sorted(max((p for p in prompts if r.startswith(p)), key=len) for r in rows) == sorted(prompts)


@pytest.mark.parametrize("extra,message", [
    (["--data", "{plain}"], "no prompts"),  # a file with no function in it
    (["--limit", "0"], "--limit must be >= 1"),
    (["--max-new-tokens", "64"], "leaves no room for a prompt"),
    (["--threads", "0"], "--threads must be an integer >= 1"),
])
def test_selfgen_bad_input_is_one_line_and_writes_nothing(tiny_ckpt, tiny_data, tmp_path, capsys, extra, message):
    out = tmp_path / "gen.jsonl"
    plain = tmp_path / "plain.txt"
    plain.write_text("x = 1\n" * 20)
    extra = [a.format(plain=plain) for a in extra]
    data = [] if "--data" in extra else ["--data", str(tiny_data)]
    rc = main(["selfgen", "--model", str(tiny_ckpt), *data, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_write_jsonl_interrupted_leaves_no_file(tmp_path):
    from layerskip.training.selfgen import write_jsonl

    def texts():
        yield "a"
        raise KeyboardInterrupt

    out = tmp_path / "gen.jsonl"
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(texts(), out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert write_jsonl(["x", "y"], out) == 2 and out.read_text() == '{"text": "x"}\n{"text": "y"}\n'
