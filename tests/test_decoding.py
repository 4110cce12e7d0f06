"""Decoding correctness: parity with transformers, early exit vs a slow reference, lossless self-speculation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerskip
from layerskip.testing import make_exact_from, make_random_model


def hf_greedy(model, ids, n, eos=None):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def slow_early_exit(model, ids, exit_layer, n):
    """Obviously correct reference: recompute the whole sequence each step, no cache."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[exit_layer]
            token = int(model.lm_head(model.model.norm(hidden[0, -1])).argmax())
            out.append(token)
            ids.append(token)
    return out


def prompt(n, seed=0, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def exact_draft_model(num_layers=6, exit_layer=2, seed=0):
    """Layers >= exit_layer leave the residual stream unchanged: every draft is right."""
    model = make_random_model("llama", num_layers=num_layers, num_kv_heads=2, seed=seed)
    make_exact_from(model, exit_layer)
    return model


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("prompt_len", [1, 5, 23])
def test_autoregressive_greedy_equals_transformers(tiny_models, name, prompt_len):
    model = tiny_models[name]
    ids = prompt(prompt_len, seed=prompt_len)
    ours = layerskip.generate(model, ids, max_new_tokens=20, eos_token_id=[])
    assert ours.token_ids == hf_greedy(model, ids, 20)
    assert ours.stats.num_new_tokens == 20 and ours.stats.stop_reason == "length"


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_early_exit_equals_slow_reference(tiny_llama, exit_layer):
    ids = prompt(7, seed=exit_layer)
    ours = layerskip.generate(tiny_llama, ids, strategy="early-exit", exit_layer=exit_layer, max_new_tokens=12,
                              eos_token_id=[])
    assert ours.token_ids == slow_early_exit(tiny_llama, ids, exit_layer, 12)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_self_speculative_is_lossless_for_every_exit_and_draft_length(tiny_models, name):
    model = tiny_models[name]
    L = model.config.num_hidden_layers
    ids = prompt(9, seed=3)
    ref = layerskip.generate(model, ids, max_new_tokens=24, eos_token_id=[]).token_ids
    for exit_layer in range(1, L):
        for d in (1, 2, 3, 5, 8, 12):
            out = layerskip.generate(model, ids, strategy="self_speculative", exit_layer=exit_layer,
                                     num_speculations=d, max_new_tokens=24, eos_token_id=[])
            assert out.token_ids == ref, (exit_layer, d)
            assert len(out.token_ids) == 24


def test_exact_draft_model_accepts_everything():
    model = exact_draft_model(num_layers=6, exit_layer=2)
    ids = prompt(11)
    ref = layerskip.generate(model, ids, max_new_tokens=40, eos_token_id=[])
    for d in (1, 4, 7, 12):
        out = layerskip.generate(model, ids, strategy="self_speculative", exit_layer=2, num_speculations=d,
                                 max_new_tokens=40, eos_token_id=[])
        assert out.token_ids == ref.token_ids
        assert out.stats.acceptance_rate == 1.0
        # every round emits k + 1 tokens: k accepted drafts and the bonus token
        assert out.stats.rounds == -(-40 // (d + 1))
    # an exit below the exact layer is a real (lossy) draft; above, it is exact too
    assert layerskip.generate(model, ids, strategy="self_speculative", exit_layer=4, num_speculations=4,
                              max_new_tokens=40, eos_token_id=[]).stats.acceptance_rate == 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), prompt_len=st.integers(1, 30), exit_layer=st.integers(1, 3),
       d=st.integers(1, 12), n=st.integers(0, 30))
def test_self_speculative_lossless_property(tiny_llama, seed, prompt_len, exit_layer, d, n):
    ids = prompt(prompt_len, seed=seed)
    ref = layerskip.generate(tiny_llama, ids, max_new_tokens=n, eos_token_id=[]).token_ids
    out = layerskip.generate(tiny_llama, ids, strategy="self_speculative", exit_layer=exit_layer,
                             num_speculations=d, max_new_tokens=n, eos_token_id=[])
    assert out.token_ids == ref


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
@pytest.mark.parametrize("eos_index", [0, 1, 6, 13])
def test_eos_stops_and_is_kept(strategy, eos_index):
    model = exact_draft_model(num_layers=4, exit_layer=2, seed=1)  # EOS lands inside accepted drafts
    ids = prompt(5, seed=9)
    free = layerskip.generate(model, ids, max_new_tokens=20, eos_token_id=[]).token_ids
    eos = free[eos_index]
    first = free.index(eos)
    spec = dict(exit_layer=2, num_speculations=8) if strategy == "self_speculative" else {}
    out = layerskip.generate(model, ids, strategy=strategy, max_new_tokens=20, eos_token_id=eos, **spec)
    assert out.token_ids == free[: first + 1]
    assert out.stats.stop_reason == "eos"


def test_eos_defaults_to_generation_config(tiny_llama):
    ids = prompt(4, seed=5)
    free = layerskip.generate(tiny_llama, ids, max_new_tokens=15, eos_token_id=[]).token_ids
    saved = tiny_llama.generation_config.eos_token_id
    tiny_llama.generation_config.eos_token_id = [999, free[3]]
    try:
        out = layerskip.generate(tiny_llama, ids, strategy="self_speculative", exit_layer=2, max_new_tokens=15)
    finally:
        tiny_llama.generation_config.eos_token_id = saved
    assert out.token_ids == free[: free.index(free[3]) + 1]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 9, 10, 17])
def test_max_new_tokens_is_exact(n):
    model = exact_draft_model(num_layers=4, exit_layer=2)
    out = layerskip.generate(model, prompt(3), strategy="self_speculative", exit_layer=2, num_speculations=8,
                             max_new_tokens=n, eos_token_id=[])
    assert len(out.token_ids) == n
    assert out.stats.drafted <= max(0, n - 1)


def test_streamer_receives_exactly_the_output(tiny_llama):
    got = []
    out = layerskip.generate(tiny_llama, prompt(6), strategy="self_speculative", exit_layer=3, num_speculations=4,
                             max_new_tokens=30, eos_token_id=[], streamer=got.extend)
    assert got == out.token_ids and len(got) == 30


def test_transformers_streamer_protocol(tiny_llama):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    ids = prompt(4)
    out = layerskip.generate(tiny_llama, ids, strategy="self_speculative", exit_layer=2, max_new_tokens=9,
                             eos_token_id=[], streamer=rec)
    assert rec.puts[0] == [ids] and rec.ended
    assert sum(rec.puts[1:], []) == out.token_ids


def test_stats_fields(tiny_llama):
    out = layerskip.generate(tiny_llama, prompt(6), strategy="self_speculative", exit_layer=2, num_speculations=3,
                             max_new_tokens=16, eos_token_id=[], timings=True)
    s = out.stats
    assert s.num_new_tokens == 16 and s.tokens_per_second > 0 and s.rounds == len(s.accepted_per_round)
    assert s.accepted == sum(s.accepted_per_round) and 0 <= s.acceptance_rate <= 1
    assert s.draft_s > 0 and s.verify_s > 0 and s.total_s >= s.draft_s + s.verify_s
    assert 0 < s.first_token_s <= s.total_s
    assert s.num_new_tokens == s.accepted + s.rounds  # each round: accepted drafts + one verifier token
    ar = layerskip.generate(tiny_llama, prompt(6), max_new_tokens=4, timings=True).stats
    assert ar.acceptance_rate is None and ar.prefill_s > 0
    untimed = layerskip.generate(tiny_llama, prompt(6), strategy="self_speculative", exit_layer=2,
                                 max_new_tokens=8).stats
    assert untimed.draft_s is None and untimed.verify_s is None and untimed.total_s > 0  # timing is opt-in
    assert set(s.as_dict()) >= {"tokens_per_second", "acceptance_rate", "num_new_tokens", "draft_s", "verify_s"}


def test_tensor_and_list_prompts_agree(tiny_llama):
    ids = prompt(5)
    a = layerskip.generate(tiny_llama, ids, max_new_tokens=5).token_ids
    assert layerskip.generate(tiny_llama, torch.tensor([ids]), max_new_tokens=5).token_ids == a
    assert layerskip.generate(tiny_llama, torch.tensor(ids), max_new_tokens=5).token_ids == a
