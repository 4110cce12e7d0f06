"""The benchmark: every strategy side by side, lossless match rate, metrics, transformers comparison."""
import pytest

from layerskip.errors import LayerSkipError
from layerskip.evaluation.bench import format_table, parse_strategies, run_bench
from layerskip.evaluation.tasks import load_task


@pytest.fixture
def prompts_task(write_jsonl):
    rows = [{"prompt": "def add(a, b):", "reference": "\n    return a + b"},
            {"prompt": "The quick brown fox", "reference": " jumps"},
            {"prompt": "Article: The cat sat.\nSummary:", "reference": " A cat sat.", "stop": ["\n\n"]}]
    return load_task(f"jsonl:{write_jsonl('p.jsonl', rows)}")


def test_bench_reports_every_strategy(tiny_exact, tokenizer, prompts_task):
    report = run_bench(tiny_exact, tokenizer, prompts_task, exit_layer=2, num_speculations=3,
                       max_new_tokens=12, progress=False)
    doc = report.to_dict()
    assert doc["num_samples"] == 3 and doc["task"].startswith("jsonl:")
    assert [r["strategy"] for r in doc["results"]] == ["autoregressive", "early_exit", "self_speculative"]
    ar, ee, ss = report.results
    assert ar.speedup == pytest.approx(1.0) and ar.match_rate == 1.0 and ar.acceptance_rate is None
    # Layers >= 2 are identities: early exit at 2 is exact, and every draft is accepted.
    assert ee.match_rate == 1.0 and ss.match_rate == 1.0 and ss.acceptance_rate == 1.0
    assert ss.exit_layer == 2 and ss.num_speculations == 3 and ee.num_speculations is None
    assert ss.predicted_speedup > 0 and ee.predicted_speedup > 0
    assert ss.tokens_per_round > 1
    for r in report.results:
        assert r.tokens_per_second > 0 and r.ms_per_token == pytest.approx(1000 / r.tokens_per_second)
        assert set(r.metrics) == {"exact_match", "rouge1", "rouge2", "rougeL", "repetition"}
    assert "self-speculative" in format_table(report)


def test_self_speculative_is_lossless_on_a_random_model(tiny, tokenizer, prompts_task):
    report = run_bench(tiny, tokenizer, prompts_task, strategies="self-speculative", exit_layer=1,
                       num_speculations=4, max_new_tokens=10, progress=False, score=False, predict=False)
    ss = report.result("self_speculative")
    assert ss.match_rate == 1.0
    assert report.token_ids["self_speculative"] == report.token_ids["autoregressive"]


def test_drafting_options_reach_every_self_speculative_run(tiny, tokenizer, prompts_task):
    vocab = list(range(0, tiny.config.vocab_size, 3))
    report = run_bench(tiny, tokenizer, prompts_task, strategies="self-speculative", exit_layer=1,
                       num_speculations=4, confidence_threshold=0.01, draft_vocab=vocab, max_new_tokens=10,
                       progress=False, score=False)
    ss = report.result("self_speculative")
    assert ss.match_rate == 1.0 and ss.confidence_threshold == 0.01 and ss.draft_vocab_size == len(vocab)
    assert ss.predicted_speedup > 0  # the cost model's draft step uses the same vocabulary
    assert "confidence threshold 0.01, draft vocabulary %d" % len(vocab) in format_table(report)
    assert report.result("autoregressive").confidence_threshold is None


def test_compare_transformers_matches_our_greedy(tiny_exact, tokenizer, prompts_task):
    report = run_bench(tiny_exact, tokenizer, prompts_task, strategies="self_speculative", exit_layer=2,
                       num_speculations=3, max_new_tokens=10, compare_transformers=True, progress=False,
                       score=False, predict=False)
    names = [r.strategy for r in report.results]
    assert names == ["autoregressive", "self_speculative", "transformers_greedy", "transformers_early_exit"]
    assert report.result("transformers_greedy").match_rate == 1.0
    assert report.result("transformers_early_exit").match_rate == 1.0
    assert report.result("transformers_early_exit").num_speculations == 3
    # The generation config is restored after the assistant_early_exit call.
    assert tiny_exact.generation_config.num_assistant_tokens is None
    assert tiny_exact.generation_config.assistant_confidence_threshold is None


def test_strategy_names():
    assert parse_strategies("self-speculative,early-exit") == ["autoregressive", "self_speculative", "early_exit"]
    with pytest.raises(LayerSkipError, match="unknown strategy"):
        parse_strategies("beam")
    with pytest.raises(LayerSkipError, match="empty"):
        parse_strategies(" , ")


def test_compare_transformers_with_a_stop_string_that_fires(tiny, tokenizer, write_jsonl):
    import layerskip

    prompt = "The quick brown fox"
    ids = tokenizer(prompt).input_ids
    text = layerskip.generate(tiny, ids, max_new_tokens=16, tokenizer=tokenizer, eos_token_id=[]).text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop
    task = load_task(f"jsonl:{write_jsonl('s.jsonl', [{'prompt': prompt, 'stop': [stop]}])}")
    report = run_bench(tiny, tokenizer, task, strategies="self_speculative", exit_layer=1, num_speculations=4,
                       max_new_tokens=16, compare_transformers=True, progress=False, score=False, predict=False)
    ours = report.token_ids["autoregressive"][0]
    assert len(ours) < 16 and stop in tokenizer.decode(ours)  # the stop string fired
    assert stop not in report.completions["autoregressive"][0]  # and is cut from the text
    for name in ("self_speculative", "transformers_greedy", "transformers_early_exit"):
        assert report.token_ids[name][0] == ours, name


def test_self_tuning_runs_beside_the_fixed_exit_layer(tiny_exact, tokenizer, prompts_task):
    report = run_bench(tiny_exact, tokenizer, prompts_task, strategies="self-speculative,self-speculative-auto",
                       exit_layer=2, num_speculations=3, max_new_tokens=12, progress=False, score=False)
    auto = report.result("self_speculative_auto")
    assert auto.match_rate == 1.0 and auto.exit_layer == "auto" and auto.num_speculations is None
    assert auto.choices.startswith("E ") and "self-speculative-auto chose: E " in format_table(report)
    stats = report.auto_stats()
    assert stats is report.stats["self_speculative_auto"][0] and stats.exit_layer_per_round
    assert report.result("self_speculative").predicted_speedup > 0  # the fixed E keeps its prediction


def test_auto_exit_layer_refuses_early_exit(tiny_exact, tokenizer, prompts_task):
    with pytest.raises(LayerSkipError, match="early-exit needs a fixed --exit-layer"):
        run_bench(tiny_exact, tokenizer, prompts_task, exit_layer="auto", max_new_tokens=4, progress=False)


def test_compile_times_compiled_twins_and_keeps_compiling_apart(tokenizer, prompts_task):
    """The same model and drafting as tests/test_static.py's compiled test (inductor's cache shares the graphs)."""
    from layerskip.testing import make_random_model

    model = make_random_model("llama", num_layers=2, hidden_size=32, num_heads=2, vocab_size=320, seed=0)
    report = run_bench(model, tokenizer, prompts_task, strategies="self-speculative", exit_layer=1,
                       num_speculations=2, draft_vocab=list(range(0, 320, 2)), max_new_tokens=20, compile=True,
                       score=False, progress=False)
    names = [r.strategy for r in report.results]
    assert names == ["autoregressive", "self_speculative", "autoregressive_compiled", "self_speculative_compiled"]
    for r in report.results:
        assert r.match_rate == 1.0 and r.tokens_per_second > 0
        assert (r.compile_s is not None) == r.strategy.endswith("_compiled")
    twin = report.result("self_speculative_compiled")
    assert twin.compile_s > 0 and twin.exit_layer == 1 and twin.num_speculations == 2
    assert twin.acceptance_rate == pytest.approx(report.result("self_speculative").acceptance_rate, abs=0.2)
    assert "self-speculative-compiled" in format_table(report) and "s compiling" in format_table(report)


def test_compile_needs_a_fixed_exit_layer(tiny, tokenizer, prompts_task):
    with pytest.raises(LayerSkipError, match="--compile needs a fixed exit layer"):
        run_bench(tiny, tokenizer, prompts_task, strategies="self-speculative", exit_layer="auto", compile=True,
                  max_new_tokens=4, progress=False)
