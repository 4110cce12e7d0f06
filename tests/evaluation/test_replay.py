"""Replay against real self-speculative decodes: the same rounds and accepted counts, from one greedy decode."""
import pytest
import torch

import layerskip
from layerskip.evaluation.cost_model import StepTimes
from layerskip.evaluation.replay import predicted_speedup, replay_rounds, trace_exits
from layerskip.testing import make_random_model


@pytest.fixture(scope="module")
def partly_agreeing_model():
    """A random Llama whose later layers write less into the residual stream, so early exits agree with the
    last layer on some tokens and not others (a plain random model agrees on almost none)."""
    model = make_random_model("llama", num_layers=5, hidden_size=64, num_kv_heads=2, vocab_size=96, seed=7)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            scale = 1.0 if i == 0 else 0.2
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


@pytest.mark.parametrize("vocab", [None, list(range(0, 96, 2))])
def test_replay_equals_real_decodes(partly_agreeing_model, vocab):
    model = partly_agreeing_model
    L, n = model.config.num_hidden_layers, 40
    prompts = [torch.randint(0, 96, (m,), generator=torch.Generator().manual_seed(s)).tolist()
               for s, m in ((0, 5), (1, 11))]
    draft_vocab = None if vocab is None else torch.tensor(vocab)
    accepted_seen = []
    for ids in prompts:
        out = layerskip.generate(model, ids, max_new_tokens=n, eos_token_id=[]).token_ids
        trace = trace_exits(model, ids, out, range(1, L), draft_vocab)
        for E in range(1, L):
            for d in (1, 3, 6):
                for threshold in (0.0, 0.05, 0.3):
                    real = layerskip.generate(model, ids, strategy="self_speculative", exit_layer=E,
                                              num_speculations=d, confidence_threshold=threshold,
                                              draft_vocab=vocab, max_new_tokens=n, eos_token_id=[])
                    assert real.token_ids == out
                    rounds = replay_rounds(trace, E, d, threshold, max_new_tokens=n)
                    assert [a for _, a in rounds] == real.stats.accepted_per_round, (E, d, threshold)
                    assert len(rounds) == real.stats.rounds
                    if threshold == 0.0:  # drafting never stops early: the draft counts are exact too
                        assert sum(k for k, _ in rounds) == real.stats.drafted
                    accepted_seen.append((real.stats.accepted, real.stats.drafted))
    accepted, drafted = map(sum, zip(*accepted_seen))
    assert 50 < accepted < 0.9 * drafted  # the model really mixes accepted and rejected drafts


def test_replay_by_hand():
    from layerskip.evaluation.replay import ExitTrace

    tokens = torch.tensor([5, 6, 7, 8, 9])
    trace = ExitTrace(tokens, {2: torch.tensor([5, 6, 0, 8, 9])}, {2: torch.tensor([0.9, 0.9, 0.9, 0.2, 0.9])})
    # d = 3: round 1 drafts 5, 6, 0 (two right) -> emits 5, 6, 7; round 2: 8 would be right but k <= 5 - 3 - 1 = 1
    assert replay_rounds(trace, 2, 3) == [(3, 2), (1, 1)]
    # threshold 0.5 stops round 2 before its first draft (confidence 0.2): one plain step, then 9 is left
    assert replay_rounds(trace, 2, 3, confidence_threshold=0.5) == [(3, 2), (0, 0), (0, 0)]
    times = StepTimes(exit_layer=2, context_len=8, t_draft=1.0, t_ar=4.0, t_verify={0: 4.0, 1: 5.0, 3: 7.0})
    # 5 tokens x 4 = 20 against (3 + 7) + (1 + 5) = 16; a flat verifier: (3 + 4) + (1 + 4) = 12
    assert predicted_speedup([replay_rounds(trace, 2, 3)], [5], times) == pytest.approx(20 / 16)
    assert predicted_speedup([replay_rounds(trace, 2, 3)], [5], times, flat_verify=True) == pytest.approx(20 / 12)
