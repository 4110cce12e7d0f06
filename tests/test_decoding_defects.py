"""Defects of the old decoding core, each pinned: option validation, warnings, stats, exactly-once work."""
import subprocess
import sys
import warnings

import pytest

import layerskip
from layerskip.decoding import LayerSkipWarning
from layerskip.errors import LayerSkipError
from layerskip.testing import make_exact_from, make_random_model

IDS = [5, 9, 2, 7, 1, 3]


def exact_model(exit_layer=2, seed=1):
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=seed)
    make_exact_from(model, exit_layer)
    return model


@pytest.mark.parametrize("sample", [False, True])
def test_repeated_draft_vocab_ids_are_rejected(tiny_llama, sample):
    with pytest.raises(LayerSkipError, match="repeated"):
        layerskip.generate(tiny_llama, IDS, strategy="self_speculative", exit_layer=2, draft_vocab=[5, 5, 7, 9],
                           do_sample=sample)


def test_acceptance_is_none_without_drafts_and_counts_only_emitted_drafts():
    model = exact_model()
    s = layerskip.generate(model, IDS, strategy="self_speculative", exit_layer=2, max_new_tokens=1).stats
    assert s.drafted == 0 and s.acceptance_rate is None
    free = layerskip.generate(model, IDS, max_new_tokens=30, eos_token_id=[]).token_ids
    eos = free[4]  # inside the first round of 8 all-accepted drafts
    out = layerskip.generate(model, IDS, strategy="self_speculative", exit_layer=2, num_speculations=8,
                             max_new_tokens=30, eos_token_id=eos)
    n, s = len(out.token_ids), out.stats
    assert out.token_ids == free[:free.index(eos) + 1]
    assert s.accepted == sum(s.accepted_per_round) <= n <= s.accepted + s.rounds  # drafts past EOS not counted


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=0), dict(temperature=-1),
                                 dict(top_p=1.5), dict(top_p=0), dict(top_k=-1)])
@pytest.mark.parametrize("sample", [False, True])
def test_bad_sampling_options_fail_whatever_the_mode(tiny_llama, bad, sample):
    with pytest.raises(LayerSkipError):
        layerskip.generate(tiny_llama, IDS, do_sample=sample, max_new_tokens=2, **bad)


def test_tiny_temperature_samples_like_greedy(tiny_llama):
    greedy = layerskip.generate(tiny_llama, IDS, max_new_tokens=6).token_ids
    cold = layerskip.generate(tiny_llama, IDS, do_sample=True, temperature=1e-45, seed=0, max_new_tokens=6)
    assert cold.token_ids == greedy


@pytest.mark.parametrize("strategy,options,expected", [
    ("autoregressive", dict(exit_layer=2), "exit_layer"),
    ("autoregressive", dict(num_speculations=3), "num_speculations"),
    ("early_exit", dict(exit_layer=2, num_speculations=3), "num_speculations"),
    ("autoregressive", dict(temperature=0.5), "temperature"),
    ("autoregressive", dict(top_k=5, top_p=0.9), "top_k"),
    ("self_speculative", dict(exit_layer=2, seed=3), "seed"),
])
def test_unused_options_warn(tiny_llama, strategy, options, expected):
    with pytest.warns(LayerSkipWarning, match=expected):
        layerskip.generate(tiny_llama, IDS, strategy=strategy, max_new_tokens=2, **options)


def test_own_options_do_not_warn(tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerSkipWarning)
        layerskip.generate(tiny_llama, IDS, strategy="self_speculative", exit_layer=2, num_speculations=3,
                           confidence_threshold=0.1, do_sample=True, temperature=0.7, top_k=5, seed=1,
                           max_new_tokens=3)


def _cli(args, capsys):
    from layerskip.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_and_unused_options(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "3"]
    for extra in (["--top-p", "1.5"], ["--top-k", "-1"], ["--sample", "--temperature", "nan"]):
        code, _, err = _cli(base + extra, capsys)
        assert code == 2 and err.startswith("layerskip: error:") and err.count("\n") == 1, err
    code, _, err = _cli(base + ["--temperature", "0.5"], capsys)
    assert code == 0 and "layerskip: warning: ignoring temperature" in err
    code, _, err = _cli(base + ["--exit-layer", "2"], capsys)
    assert code == 0 and "layerskip: warning: ignoring exit_layer" in err
    code, _, err = _cli(base + ["--sample", "--temperature", "1e-45"], capsys)
    assert code == 0 and "error" not in err


def test_non_utf8_stdin_is_one_line(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "layerskip", "generate", "--model", str(tiny_checkpoint)],
                          input=b"\xff\xfe bad", capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("layerskip: error:") and "UTF-8" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("exit_layer,d", [(1, 3), (2, 5), (3, 2)])
@pytest.mark.parametrize("exact", [False, True])
def test_every_kept_layer_position_is_computed_exactly_once(exit_layer, d, exact):
    """Hook the layer-range forward: no (layer, position) whose result is kept is ever computed twice.

    A kept position p holds token seq[p] (prompt + emitted, the last emitted never fed). Counting the computations
    of each (layer, p): every one is computed; the prompt's exactly once in every layer (its early layers in the
    first draft step, its late layers in the first verification); with an exact draft nothing is ever rejected,
    so every (layer, position) is computed exactly once and nothing else is. (A rejected draft's position is
    computed again for the correction token: that recomputation is for a different token.)
    """
    model = exact_model(exit_layer, seed=exit_layer) if exact else make_random_model("llama", num_layers=4,
                                                                                      num_kv_heads=2, seed=0)
    engine = layerskip.prepare(model)
    calls, run = [], engine.run
    engine.run = lambda h, start, end, cache, pos, taps=None: calls.append((start, end, pos, h.shape[1])) or \
        run(h, start, end, cache, pos, taps)
    out = layerskip.generate(engine, IDS, strategy="self_speculative", exit_layer=exit_layer, num_speculations=d,
                             max_new_tokens=25, eos_token_id=[])
    seq = IDS + out.token_ids[:-1]
    count = {}
    for start, end, pos, T in calls:
        for layer in range(start, end):
            for p in range(pos, pos + T):
                count[(layer, p)] = count.get((layer, p), 0) + 1
    L = 4
    assert all(count.get((l, p), 0) >= 1 for l in range(L) for p in range(len(seq)))  # nothing skipped
    if exact:  # nothing rejected: every (layer, position) computed exactly once, nothing beyond
        assert all(count[(l, p)] == 1 for l in range(L) for p in range(len(seq)))
        assert len(count) == L * len(seq)
    # the prompt's positions are never recomputed, in any layer
    assert all(count[(l, p)] == 1 for l in range(L) for p in range(len(IDS)))
    ar = layerskip.prepare(model)
    ar_calls, ar_run = [], ar.run
    ar.run = lambda h, start, end, cache, pos, taps=None: ar_calls.append((start, end, pos, h.shape[1])) or \
        ar_run(h, start, end, cache, pos, taps)
    assert layerskip.generate(ar, IDS, max_new_tokens=25, eos_token_id=[]).token_ids == out.token_ids
    assert sum((e - s) * T for s, e, _, T in ar_calls) == L * len(seq)  # autoregressive: once each


@pytest.mark.parametrize("exit_layer,d", [(1, 2), (2, 4), (3, 6)])
def test_sliding_window_smaller_than_the_sequence_stays_lossless(exit_layer, d):
    """Rollback with a window of 6 over 40 positions: rejected drafts inside the window must not leak."""
    model = make_random_model("mistral", num_layers=4, num_kv_heads=2, head_dim=16, sliding_window=6, seed=3)
    ids = list(range(3, 13))
    ar = layerskip.generate(model, ids, max_new_tokens=30, eos_token_id=[])
    ss = layerskip.generate(model, ids, strategy="self_speculative", exit_layer=exit_layer, num_speculations=d,
                            max_new_tokens=30, eos_token_id=[])
    assert ss.token_ids == ar.token_ids and ss.stats.accepted < ss.stats.drafted  # rollbacks happened
