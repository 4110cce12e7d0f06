"""Self-speculative sampling over whole sequences with k = 3 drafts a round: chained acceptance, the residual
after >= 1 acceptances and the bonus token after k drafts must leave the full model's distribution intact."""
import itertools

import pytest
import torch

import layerskip
from layerskip.decoding.sampling import SamplingParams, probabilities
from layerskip.testing import make_random_model

V, N_NEW, PROMPT = 6, 4, [1, 4, 2]
PARAMS = SamplingParams(True, 2.0)


def exact_sequence_distribution(model) -> dict[tuple, float]:
    """P(x1..x4) = prod_i p(x_i | prompt, x_<i) from plain transformers forwards: the slow reference."""
    seqs = list(itertools.product(range(V), repeat=N_NEW))
    ids = torch.tensor([PROMPT + list(s[:-1]) for s in seqs])  # (V^4, T + 3): every prefix in one pass
    with torch.no_grad():
        p = probabilities(model(ids).logits[:, len(PROMPT) - 1:], PARAMS)  # (V^4, 4, V)
    picked = p.gather(2, torch.tensor(seqs)[:, :, None])[..., 0]  # (V^4, 4)
    return dict(zip(seqs, picked.prod(1).tolist()))


@pytest.mark.parametrize("exit_layer", [1, "auto"])  # auto: E and d chosen per round from what rounds verified
def test_sampled_sequences_follow_the_full_model(exit_layer):
    model = make_random_model("llama", num_layers=3, hidden_size=32, num_heads=2, vocab_size=V, seed=11)
    exact = exact_sequence_distribution(model)
    engine = layerskip.prepare(model)
    rows, batches = 200, 100  # N = 20000 sequences, decoded as batches of 200 rows (row b: seed + b)
    counts, accepted, full_rounds = {}, 0, 0
    for i in range(batches):
        out = layerskip.generate(engine, [PROMPT] * rows, strategy="self_speculative", exit_layer=exit_layer,
                                 num_speculations=3, max_new_tokens=N_NEW, do_sample=True, temperature=2.0,
                                 eos_token_id=[], seed=i * rows)
        for r in out:
            counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
            accepted += sum(a >= 1 for a in r.stats.accepted_per_round)
            k = min(r.stats.speculations_per_round[0], N_NEW - 1)  # the first round's drafts
            full_rounds += k > 0 and r.stats.accepted_per_round[0] == k  # all k accepted: a bonus token
    n = rows * batches
    assert accepted > 1000 and full_rounds > 100  # the residual and bonus paths were really taken
    # Each position's marginal (6 outcomes): sampling noise in TV ~ sqrt(6 / (2 pi N)) ~ 0.007 at N = 20000,
    # so a 0.02 bias fails; the joint of the last two tokens (36 outcomes, noise ~ 0.017) gets 0.035.
    for pos in range(N_NEW):
        emp, ref = [0.0] * V, [0.0] * V
        for s, c in counts.items():
            emp[s[pos]] += c / n
        for s, q in exact.items():
            ref[s[pos]] += q
        assert 0.5 * sum(abs(a - b) for a, b in zip(emp, ref)) < 0.02, pos
    emp, ref = {}, {}
    for s, c in counts.items():
        emp[s[2:]] = emp.get(s[2:], 0.0) + c / n
    for s, q in exact.items():
        ref[s[2:]] = ref.get(s[2:], 0.0) + q
    assert 0.5 * sum(abs(emp.get(k, 0.0) - ref[k]) for k in ref) < 0.035
