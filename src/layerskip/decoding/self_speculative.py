"""Self-speculative decoding (LayerSkip §4.2): draft with the first E layers, verify with the rest.

Terminology: L layers; exit layer E (1 <= E < L); d = num_speculations, the most drafts per round;
k <= d the drafts of this round (fewer near max_new_tokens). x0 = the last accepted token, not yet
in the cache (the whole prompt in the first round). Accepted / bonus tokens: see sampling.py.

One round, with x0's first position n:
  draft   x0 through layers [0, E) -> exit hidden h(x0); head -> d1; d1 through [0, E) -> d2; ... dk.
  verify  dk through [0, E) (unless drafting stopped early and fed it already); then layers [E, L) on
          the exit hidden states [h(x0), h(d1) .. h(dk)] (k+1 positions, reused from drafting: the
          "exit cache") -> k+1 predictions in one pass.
  accept  the longest prefix of drafts the verifier agrees with, then the verifier's next token.
  rollback  every layer's cache is cut to n + 1 + a; the token just emitted becomes x0.
Every layer's work on every kept position is done exactly once: the prompt's early layers run in
the first draft step and its late layers in the first verification; no second cache, no re-prefill.

Two options make drafting cheaper, and both stay lossless (the verifier alone decides what is emitted):
  confidence_threshold  adaptive draft length: a round stops drafting where the draft distribution's top
          probability (greedy: the would-be draft's own) is below the threshold, as that draft would most
          likely be rejected, and verifies what it has (with no draft at all it is one ordinary step,
          split at E). The rule looks at the distribution, never at a sampled token, so sampling stays exact.
  draft_vocab  the draft head scores only these token ids (draft_vocab.py), a fraction of a large head.
"""
from __future__ import annotations

import torch

from layerskip.decoding.result import GenerationStats
from layerskip.decoding.sampling import SamplingParams, greedy_accept, probabilities, speculative_accept
from layerskip.decoding.stopping import StopChecker
from layerskip.decoding.timing import clock
from layerskip.forward import LayerStack


def draft(stack: LayerStack, cache, pending: torch.Tensor, pos: int, exit_layer: int, k: int,
          params: SamplingParams, generator=None, *, vocab: torch.Tensor | None = None,
          confidence_threshold: float = 0.0):
    """Feed `pending` (1, P) at `pos` and the drafted tokens through layers [0, E); draft up to k tokens.

    Args:
        vocab: the draft vocabulary (token ids), or None for the full one (draft_vocab.py).
        confidence_threshold: stop drafting where the draft distribution's top probability is below it
            (adaptive draft length; greedy: the would-be draft's own probability). 0: always draft k.
    Returns:
        (exit hidden states (1, P + n, H) of the tokens fed, drafts (j,), draft probs (j, V) or None),
        j <= k drafts; n = j - 1 when drafting ran to k (the verify pass feeds the last draft), else j.
    """
    h = stack.run(stack.embed(pending), 0, exit_layer, cache, pos)  # (1, P, H)
    exits, tokens, probs = [h], [], []
    for i in range(k):
        token, q = _draft_token(stack.logits(h[:, -1], vocab), params, generator, vocab, confidence_threshold,
                                stack.lm_head.weight.shape[0])
        if token is None:  # not confident enough: end the round's drafting here
            break
        tokens.append(token)
        probs.append(q)
        if i + 1 < k:
            h = stack.run(stack.embed(token), 0, exit_layer, cache, pos + pending.shape[1] + i)  # (1, 1, H)
            exits.append(h)
    drafts = torch.cat(tokens, 1)[0] if tokens else pending.new_empty(0)  # (j,)
    q = torch.cat(probs, 0) if params.do_sample and tokens else None  # (j, V)
    return torch.cat(exits, 1), drafts, q


def _draft_token(logits: torch.Tensor, params: SamplingParams, generator, vocab, threshold: float, full_size: int):
    """(1, V') draft logits (V' = len(vocab) with a draft vocabulary) -> (token (1, 1), q (1, V) or None),
    or (None, None) when the draft distribution's top probability is below `threshold`.

    The stop is decided before a token is drawn, from the distribution alone: when sampling, a rule that
    looked at the drawn token would bias the proposals and break the acceptance rule's guarantee.
    """
    q = probabilities(logits, params) if params.do_sample else None  # (1, V')
    if threshold > 0:
        top = q.max() if q is not None else torch.softmax(logits[0].float(), -1).max()
        if float(top) < threshold:
            return None, None
    if q is None:
        token = logits.argmax(-1, keepdim=True)
    else:
        token = torch.multinomial(q, 1, generator=generator)
    if vocab is not None:
        token = vocab[token]
        if q is not None:  # the draft distribution over the full vocabulary: zero outside `vocab`
            q = q.new_zeros(q.shape[0], full_size).index_copy_(1, vocab, q)
    return token, q


def verify(stack: LayerStack, cache, exits: torch.Tensor, drafts: torch.Tensor, pos: int, exit_layer: int,
           num_pending: int):
    """Feed the last draft through [0, E) if drafting did not, then layers [E, L) on all exit hidden states.

    Args:
        exits: (1, N, H) exit hidden states from `draft`, positions from `pos`.
        drafts: (k,) draft tokens. num_pending: P, the tokens fed before the drafts.
    Returns:
        logits (k + 1, V) of the full model at x0's last position and at d1..dk.
    """
    k = drafts.shape[0]
    if exits.shape[1] < num_pending + k:  # the last draft has not been through [0, E) yet
        last = stack.run(stack.embed(drafts[-1:][None]), 0, exit_layer, cache, pos + exits.shape[1])  # (1, 1, H)
        exits = torch.cat([exits, last], 1)  # (1, P + k, H)
    h = stack.run(exits, exit_layer, stack.num_layers, cache, pos)  # (1, P + k, H)
    return stack.logits(h[0, -(k + 1):])  # (k + 1, V)


def decode_self_speculative(stack: LayerStack, prompt: torch.Tensor, *, exit_layer: int, num_speculations: int,
                            params: SamplingParams, stopper: StopChecker, stats: GenerationStats,
                            generator=None, on_tokens=None, cache=None, draft_vocab: torch.Tensor | None = None,
                            confidence_threshold: float = 0.0) -> list[int]:
    """Lossless self-speculative decoding of up to stopper.max_new_tokens tokens after prompt (1, T).

    `cache` (optional, for inspection) must cover all L layers and T + max_new_tokens positions.
    `draft_vocab` and `confidence_threshold`: see `draft`.
    """
    T = prompt.shape[1]
    cache = cache or stack.new_cache(T + stopper.max_new_tokens)
    generated: list[int] = []
    pending, pos = prompt, 0
    stats.draft_s = stats.verify_s = 0.0
    t0 = clock(stack.device)
    while stopper.remaining(generated) > 0:
        k = min(num_speculations, stopper.remaining(generated) - 1)  # room for the verifier's own token
        t_round = clock(stack.device)
        exits, drafts, q = draft(stack, cache, pending, pos, exit_layer, k, params, generator, vocab=draft_vocab,
                                 confidence_threshold=confidence_threshold)
        k = drafts.shape[0]
        t_drafted = clock(stack.device)
        logits = verify(stack, cache, exits, drafts, pos, exit_layer, pending.shape[1])  # (k + 1, V)
        if params.do_sample:
            a, nxt = speculative_accept(drafts, q, probabilities(logits, params), generator)
        else:
            a, nxt = greedy_accept(drafts, logits.argmax(-1))
        t_verified = clock(stack.device)
        stats.draft_s += t_drafted - t_round
        stats.verify_s += t_verified - t_drafted
        if stats.first_token_s is None:
            stats.first_token_s = t_verified - t0
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        stats.accepted_per_round.append(a)
        emit, reason = stopper.accept(generated, drafts[:a].tolist() + [nxt])
        generated += emit
        if on_tokens:
            on_tokens(emit)
        if reason:
            stats.stop_reason = reason
            break
        pos += pending.shape[1] + a
        cache.crop(pos)
        pending = prompt.new_tensor([[nxt]])
    stats.total_s = clock(stack.device) - t0
    return generated
