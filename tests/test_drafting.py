"""Adaptive draft length (confidence_threshold) and the draft vocabulary: both must stay lossless, and the
rounds must be exactly those of a slow reference that drafts by recomputing the whole sequence."""
import pytest
import torch

import layerskip
from layerskip import draft_vocab
from layerskip.errors import LayerSkipError
from layerskip.forward import LayerStack
from layerskip.testing import make_random_model


def prompt(n, seed=0, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def slow_rounds(model, ids, out, exit_layer, d, threshold, vocab):
    """Reference (rounds, drafted, accepted) for greedy self-speculation with adaptive drafting: each draft
    recomputes prompt + accepted + drafts from scratch (no cache) and reads the exit after E layers."""
    n = len(out)
    t = rounds = drafted = accepted = 0
    with torch.inference_mode():
        while t < n:
            k = min(d, n - t - 1)
            drafts = []
            for _ in range(k):
                seq = torch.tensor([list(ids) + out[:t] + drafts])
                hidden = model(seq, output_hidden_states=True).hidden_states[exit_layer][0, -1]
                logits = model.lm_head(model.model.norm(hidden))
                if vocab is not None:
                    logits = logits[vocab]
                probs = logits.softmax(-1)
                j = int(probs.argmax())
                if threshold and float(probs[j]) < threshold:
                    break
                drafts.append(int(vocab[j]) if vocab is not None else j)
            a = 0
            while a < len(drafts) and drafts[a] == out[t + a]:
                a += 1
            rounds, drafted, accepted, t = rounds + 1, drafted + len(drafts), accepted + a, t + a + 1
    return rounds, drafted, accepted


VOCABS = {"full": None, "half": list(range(0, 256, 2)), "one": [7]}


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_adaptive_drafting_is_lossless(tiny_models, name):
    model = tiny_models[name]
    L = model.config.num_hidden_layers
    ids = prompt(9, seed=5)
    ref = layerskip.generate(model, ids, max_new_tokens=24, eos_token_id=[]).token_ids
    for exit_layer in range(1, L):
        for d in (1, 3, 8):
            for threshold in (0.0, 0.006, 0.012, 0.5):
                for vocab in VOCABS.values():
                    out = layerskip.generate(model, ids, strategy="self_speculative", exit_layer=exit_layer,
                                             num_speculations=d, confidence_threshold=threshold, draft_vocab=vocab,
                                             max_new_tokens=24, eos_token_id=[])
                    assert out.token_ids == ref, (exit_layer, d, threshold, vocab and len(vocab))


@pytest.mark.parametrize("vocab,threshold", [("full", 0.0), ("full", 0.006), ("half", 0.0), ("half", 0.012),
                                             ("one", 0.0)])
def test_rounds_match_the_slow_reference(tiny_llama, vocab, threshold):
    """tiny_llama drafts with probabilities near 1/V: thresholds just above that (chosen by looking) make
    some rounds stop early and others not, so every branch of the drafting loop runs."""
    vocab = VOCABS[vocab]
    ids = prompt(6, seed=2)
    early = False
    for exit_layer, d in ((1, 4), (2, 3), (3, 6)):
        kw = dict(strategy="self_speculative", exit_layer=exit_layer, num_speculations=d, draft_vocab=vocab,
                  max_new_tokens=20, eos_token_id=[])
        out = layerskip.generate(tiny_llama, ids, confidence_threshold=threshold, **kw)
        s = out.stats
        assert (s.rounds, s.drafted, s.accepted) == slow_rounds(tiny_llama, ids, out.token_ids, exit_layer, d,
                                                                threshold, vocab), (exit_layer, d)
        early |= 0 < s.drafted < layerskip.generate(tiny_llama, ids, **kw).stats.drafted
    assert early or threshold == 0


def test_threshold_drafts_less_on_an_exact_draft_model():
    """Layers past the exit do nothing, so every draft is right; a threshold above every draft's
    probability turns self-speculation into one token per round, and 0 drafts d per round."""
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=0)
    for layer in model.model.layers[2:]:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    ids = prompt(5)
    kw = dict(strategy="self_speculative", exit_layer=2, num_speculations=4, max_new_tokens=20, eos_token_id=[])
    full = layerskip.generate(model, ids, confidence_threshold=0.0, **kw).stats
    none = layerskip.generate(model, ids, confidence_threshold=0.999, **kw).stats
    assert full.rounds == 4 and full.acceptance_rate == 1.0
    assert none.rounds == 20 and none.drafted == 0


def test_sub_head_scores_the_chosen_rows(tiny_llama):
    stack = LayerStack(tiny_llama)
    h = torch.randn(3, tiny_llama.config.hidden_size)
    vocab = torch.tensor([5, 0, 200, 17])
    with torch.inference_mode():
        assert torch.allclose(stack.logits(h, vocab), stack.logits(h)[:, vocab], atol=1e-6)
        assert torch.allclose(stack.logits(h[:1], vocab), stack.logits(h[:1])[:, vocab], atol=1e-6)
    # gathered rows follow the weights when they change in place (e.g. training between calls)
    model = make_random_model("llama", num_layers=2, seed=3)
    stack = LayerStack(model)
    with torch.inference_mode():
        before = stack.logits(h[:1], vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(stack.logits(h[:1], vocab), 2 * before, atol=1e-5)


def test_rank_tokens_orders_by_count_and_stops_at_coverage():
    counts = torch.tensor([5, 0, 50, 5, 40])  # total 100
    assert draft_vocab.rank_tokens(counts, 0.5) == [2]
    assert draft_vocab.rank_tokens(counts, 0.9) == [2, 4]
    assert draft_vocab.rank_tokens(counts, 0.95) == [2, 4, 0]  # ties: lower id first
    assert draft_vocab.rank_tokens(counts, 1.0) == [2, 4, 0, 3]  # never a token that does not occur
    assert draft_vocab.rank_tokens(torch.zeros(4), 0.99) == []
    assert draft_vocab.count_tokens(torch.tensor([[1, 1], [3, 0]]), 5).tolist() == [1, 2, 0, 1, 0]


def test_resolve_draft_vocab():
    stored = [3, 1, 2]
    assert draft_vocab.resolve(None, None, 10, "cpu") is None
    assert draft_vocab.resolve(stored, None, 10, "cpu").tolist() == [3, 1, 2]
    assert draft_vocab.resolve(stored, 0, 10, "cpu") is None
    assert draft_vocab.resolve(stored, 2, 10, "cpu").tolist() == [3, 1]
    assert draft_vocab.resolve(None, [4, 5], 10, "cpu").tolist() == [4, 5]
    assert draft_vocab.resolve(None, list(range(10)), 10, "cpu") is None  # the whole vocabulary
    for bad, match in ((-1, ">= 0"), (2.5, "integer"), (True, "integer"), ([], "empty"), ([3, 10], "outside")):
        with pytest.raises(LayerSkipError, match=match):
            draft_vocab.resolve(stored, bad, 10, "cpu")
    with pytest.raises(LayerSkipError, match="layerskip train"):
        draft_vocab.resolve(None, 5, 10, "cpu")


def test_stored_settings_are_the_defaults():
    model = make_random_model("llama", num_layers=4, num_kv_heads=2, seed=0)
    model.config.layerskip = {"exit_layer": 2, "num_speculations": 3, "confidence_threshold": 0.02}
    model.draft_vocab_ids = list(range(0, 256, 4))  # what models.load reads from draft_vocab.json
    out = layerskip.generate(model, prompt(4), strategy="self_speculative", max_new_tokens=10, eos_token_id=[])
    s = out.stats
    assert (s.exit_layer, s.num_speculations, s.confidence_threshold, s.draft_vocab_size) == (2, 3, 0.02, 64)
    assert out.token_ids == layerskip.generate(model, prompt(4), max_new_tokens=10, eos_token_id=[]).token_ids
    overridden = layerskip.generate(model, prompt(4), strategy="self_speculative", confidence_threshold=0,
                                    draft_vocab=0, max_new_tokens=10, eos_token_id=[]).stats
    assert (overridden.confidence_threshold, overridden.draft_vocab_size) == (0.0, None)
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(LayerSkipError, match="confidence_threshold"):
            layerskip.generate(model, prompt(4), strategy="self_speculative", confidence_threshold=bad)
