"""The cost model: formulas by hand, and isolated step timings that make sense."""
import pytest
import torch

from layerskip.errors import LayerSkipError
from layerskip.evaluation.cost_model import (StepTimes, expected_tokens_per_round, measure_step_times,
                                             predicted_early_exit_speedup, predicted_speedup)


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0  # only the verifier's own token
    assert expected_tokens_per_round(1.0, 4) == 5.0  # k drafts + bonus
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError):
        expected_tokens_per_round(1.5, 2)


def test_predicted_speedup_by_hand():
    times = StepTimes(exit_layer=2, context_len=8, t_draft=1.0, t_ar=4.0, t_verify={2: 5.0, 3: 6.0})
    # n̄ t_ar / (k t_E + t_v(k)) = 3 * 4 / (2 * 1 + 5)
    assert predicted_speedup(times, 3.0, 2.0) == pytest.approx(12 / 7)
    # k̄ = 2.5: t_v interpolated to 5.5
    assert predicted_speedup(times, 3.0, 2.5) == pytest.approx(12 / (2.5 + 5.5))
    assert predicted_early_exit_speedup(times) == 4.0
    with pytest.raises(KeyError):
        times.verify_time(4)
    assert times.as_dict()["t_verify"] == {"2": 5.0, "3": 6.0}


def test_measure_step_times(tiny_exact):
    times = measure_step_times(tiny_exact, 1, [0, 2, 3], context_len=16, repeats=3, warmup=1)
    assert times.exit_layer == 1 and times.context_len == 16
    assert sorted(times.t_verify) == [0, 2, 3]
    assert times.t_draft > 0 and times.t_ar > 0 and all(t > 0 for t in times.t_verify.values())
    assert list(measure_step_times(tiny_exact, 2, [0], context_len=4, repeats=1, warmup=0).t_verify) == [0]
    with pytest.raises(LayerSkipError, match="exit_layer"):
        measure_step_times(tiny_exact, 4, [1])


def test_measure_step_times_drafts_over_the_draft_vocabulary(tiny_exact, monkeypatch):
    from layerskip.forward import LayerStack
    seen = []
    logits = LayerStack.logits

    def spy(self, h, vocab=None):
        seen.append(None if vocab is None else vocab.tolist())
        return logits(self, h, vocab)

    monkeypatch.setattr(LayerStack, "logits", spy)
    vocab = torch.tensor([5, 1, 7])
    times = measure_step_times(tiny_exact, 1, [1], context_len=8, repeats=2, warmup=1, draft_vocab=vocab)
    assert seen.count([5, 1, 7]) == 3  # every draft step (warmup + repeats), and nothing else
    assert seen.count(None) == len(seen) - 3 > 0
    assert times.t_exit > 0  # early exit's step keeps the full head: timed apart
    assert predicted_early_exit_speedup(times) == times.t_ar / times.t_exit
    assert measure_step_times(tiny_exact, 1, [1], context_len=8, repeats=2, warmup=1).t_exit is None
