"""Self-speculative decoding (LayerSkip §4.2): draft with the first E layers, verify with the rest.

Terminology: L layers; exit layer E (1 <= E < L); d = num_speculations, the most drafts per round;
k <= d the drafts of this round (fewer near max_new_tokens). x0 = the pending tokens: the last accepted
token, not yet in the cache (the whole prompt in the first round), P of them. Accepted / bonus tokens: see
sampling.py.

One round (`run_round`), with x0's first position n, as four named steps:
  draft     x0 through layers [0, E) -> exit hidden h(x0); head -> d1; d1 through [0, E) -> d2; ... dk.
            Returns a `Draft`: the tokens, their draft probabilities (sampling), and the exit hidden states of
            every position that has been through [0, E) (`fed`: how many of the drafts that includes).
  verify    the drafts not yet fed go through [0, E) (the last one, unless drafting stopped early); then
            layers [E, L) on the exit hidden states [h(x0), h(d1) .. h(dk)] (P + k positions, reused from
            drafting: the "exit cache") -> k + 1 predictions in one pass.
  accept    the longest prefix of drafts the verifier agrees with, then the verifier's next token.
  rollback  every layer's cache is cut to n + P + a; the token just emitted becomes x0.
Every layer's work on every kept position is done exactly once: the prompt's early layers run in the first
draft step and its late layers in the first verification; no second cache, no re-prefill.

Two options make drafting cheaper, and both stay lossless (the verifier alone decides what is emitted):
  confidence_threshold  adaptive draft length: a round stops drafting where the draft distribution's top
          probability (greedy: the would-be draft's own) is below the threshold, as that draft would most
          likely be rejected, and verifies what it has (with no draft at all it is one ordinary step,
          split at E). The rule looks at the distribution, never at a sampled token, so sampling stays exact.
  draft_vocab  the draft head scores only these token ids (layerskip.draft_vocab), a fraction of a large head.

The functions here are the hot path and keep no statistics; `decode_self_speculative` aggregates the
`Round`s. The cost model and replay (layerskip.evaluation) time and replay these same functions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from layerskip.decoding import auto
from layerskip.decoding.result import GenerationStats, Timer
from layerskip.decoding.sampling import SamplingParams, greedy_accept, probabilities, speculative_accept
from layerskip.decoding.stopping import StopChecker
from layerskip.forward import LayerStack


@dataclass
class Draft:
    """What one round's drafting produced.

    tokens: (k,) the drafts. probs: (k, V) their draft distributions over the full vocabulary (sampling only).
    exits: (1, P + fed, H) exit hidden states (after layer E-1) of the pending tokens and the first `fed`
    drafts, from position `pos`. fed is k - 1 when drafting ran to k (the last draft is fed by verify), else k.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None
    exits: torch.Tensor
    pos: int
    num_pending: int

    @property
    def k(self) -> int:
        return self.tokens.shape[0]

    @property
    def fed(self) -> int:
        return self.exits.shape[1] - self.num_pending


@dataclass
class Round:
    """One round's outcome: k drafted, a accepted by the verifier, `tokens` = drafts[:a] + [next token].

    unsure: drafting stopped before its cap because a draft was below the confidence threshold.
    shadow: on a probe round (decoding/auto.py), {probed exit layer: [(accepted, confident) flags]}: at x0 and the
    accepted drafts, whether its draft would have been confident and accepted, and confident.
    """

    drafted: int
    accepted: int
    tokens: list[int]
    unsure: bool = False
    shadow: dict[int, list] = field(default_factory=dict)


def confident(top_probability: float, threshold: float) -> bool:
    """The adaptive-draft-length rule: keep drafting while the draft distribution's top probability >= C."""
    return threshold <= 0 or top_probability >= threshold


def draft(stack: LayerStack, cache, pending: torch.Tensor, pos: int, exit_layer: int, k: int,
          params: SamplingParams, generator=None, *, vocab: torch.Tensor | None = None,
          confidence_threshold: float = 0.0, taps: dict | None = None) -> Draft:
    """Feed `pending` (1, P) at `pos` and the drafted tokens through layers [0, E); draft up to k tokens.

    Args:
        vocab: the draft vocabulary (token ids), or None for the full one.
        confidence_threshold: stop drafting where the draft distribution's top probability is below it
            (adaptive draft length; greedy: the would-be draft's own probability). 0: always draft k.
        taps: collects the hidden states at exit layers up to E (LayerStack.run).
    """
    h = stack.run(stack.embed(pending), 0, exit_layer, cache, pos, taps)  # (1, P, H)
    exits, tokens, probs = [h], [], []
    for i in range(k):
        token, q = draft_token(stack.logits(h[:, -1], vocab), params, generator, vocab, confidence_threshold,
                               stack.vocab_size)
        if token is None:  # not confident enough: end the round's drafting here
            break
        tokens.append(token)
        probs.append(q)
        if i + 1 < k:
            h = stack.run(stack.embed(token), 0, exit_layer, cache, pos + pending.shape[1] + i, taps)  # (1, 1, H)
            exits.append(h)
    drafts = torch.cat(tokens, 1)[0] if tokens else pending.new_empty(0)  # (k,)
    q = torch.cat(probs, 0) if params.do_sample and tokens else None  # (k, V)
    return Draft(drafts, q, torch.cat(exits, 1), pos, pending.shape[1])


def draft_token(logits: torch.Tensor, params: SamplingParams, generator, vocab, threshold: float, full_size: int):
    """(1, V') draft logits (V' = len(vocab) with a draft vocabulary) -> (token (1, 1), q (1, V) or None),
    or (None, None) when the draft distribution's top probability is below `threshold`.

    The stop is decided before a token is drawn, from the distribution alone: when sampling, a rule that
    looked at the drawn token would bias the proposals and break the acceptance rule's guarantee.
    """
    q = probabilities(logits, params) if params.do_sample else None  # (1, V')
    if threshold > 0:
        top = q.max() if q is not None else torch.softmax(logits[0].float(), -1).max()
        if not confident(float(top), threshold):
            return None, None
    if q is None:
        token = logits.argmax(-1, keepdim=True)
    else:
        token = torch.multinomial(q, 1, generator=generator)
    if vocab is not None:
        token = vocab[token]
        if q is not None:  # the draft distribution over the full vocabulary: zero outside `vocab` (ids unique)
            q = q.new_zeros(q.shape[0], full_size).index_copy_(1, vocab, q)
    return token, q


def verify(stack: LayerStack, cache, d: Draft, exit_layer: int, taps: dict | None = None) -> torch.Tensor:
    """Feed the drafts not yet through [0, E), then layers [E, L) on all exit hidden states (`taps`: as in draft,
    at any layer).

    Returns:
        logits (k + 1, V) of the full model at x0's last position and at d1..dk.
    """
    exits = d.exits
    if d.fed < d.k:  # the last draft has not been through [0, E) yet
        last = stack.run(stack.embed(d.tokens[d.fed:][None]), 0, exit_layer, cache, d.pos + exits.shape[1], taps)
        exits = torch.cat([exits, last], 1)  # (1, P + k, H)
    h = stack.run(exits, exit_layer, stack.num_layers, cache, d.pos, taps)  # (1, P + k, H)
    return stack.logits(h[0, -(d.k + 1):])  # (k + 1, V)


def accept(d: Draft, logits: torch.Tensor, params: SamplingParams, generator=None) -> tuple[int, int]:
    """(a accepted drafts, the verifier's next token) from the verify logits (k + 1, V); see sampling.py."""
    if params.do_sample:
        return speculative_accept(d.tokens, d.probs, probabilities(logits, params), generator)
    return greedy_accept(d.tokens, logits.argmax(-1))


def rollback(cache, d: Draft, accepted: int) -> int:
    """Keep x0 and the accepted drafts in every layer, nothing after; returns the next x0's position."""
    pos = d.pos + d.num_pending + accepted
    cache.crop(pos)
    return pos


def run_round(stack: LayerStack, cache, pending: torch.Tensor, pos: int, k: int, *, exit_layer: int,
              params: SamplingParams, generator=None, vocab: torch.Tensor | None = None,
              confidence_threshold: float = 0.0, timer: Timer | None = None, probes=()) -> tuple[Round, int]:
    """draft -> verify -> accept -> rollback. Returns (the Round, the position of the next pending token).

    probes: exit layers (E among them, which calibrates the others) whose drafts to measure on this round's
        verified positions (Round.shadow).
    The cache afterwards: every layer valid up to the returned position (x0 and the accepted drafts).
    """
    taps = {e: [] for e in probes} if probes else None
    d = draft(stack, cache, pending, pos, exit_layer, k, params, generator, vocab=vocab,
              confidence_threshold=confidence_threshold, taps=taps)
    if timer:
        timer.lap("draft_s")
    logits = verify(stack, cache, d, exit_layer, taps)
    a, nxt = accept(d, logits, params, generator)
    if timer:
        timer.lap("verify_s")
    shadow = {}
    if taps:  # positions x0 .. d_a: the verifier confirmed their context; its argmax there is the target
        first = d.num_pending - 1
        hidden = {e: torch.cat(t, 1)[0, first:first + a + 1] for e, t in taps.items()}
        shadow = auto.shadow_outcomes(stack, hidden, logits[:a + 1].argmax(-1), [a + 1], vocab,
                                      confidence_threshold)
    return Round(d.k, a, d.tokens[:a].tolist() + [nxt], d.k < k, shadow), rollback(cache, d, a)


def decode_self_speculative(stack: LayerStack, prompt: torch.Tensor, *, exit_layer: int | str,
                            num_speculations: int | None, params: SamplingParams, stopper: StopChecker,
                            stats: GenerationStats, generator=None, on_tokens=None, cache=None,
                            draft_vocab: torch.Tensor | None = None, confidence_threshold: float = 0.0,
                            timer: Timer | None = None, clock=time.perf_counter) -> list[int]:
    """Lossless self-speculative decoding of up to stopper.max_new_tokens tokens after prompt (1, T).

    exit_layer "auto": E and d chosen per round (decoding/auto.py), num_speculations then the longest draft
    (None: auto's own cap). `cache` (optional, for inspection) must cover all L layers and T + max_new_tokens
    positions. `draft_vocab` and `confidence_threshold`: see `draft`. `timer`: split draft / verify time (each
    lap synchronises the device; None: no timing inside the loop). `clock`: what auto times rounds with (seconds;
    a test passes a simulated machine's clock to make auto's choices deterministic).
    """
    T = prompt.shape[1]
    cache = cache or stack.new_cache(T + stopper.max_new_tokens)
    plan = auto.new_plan(stack, draft_vocab, start=auto.stored_exit_layer(stack), max_speculations=num_speculations,
                         max_rows=1, threshold=confidence_threshold) if exit_layer == auto.AUTO else None
    E, d, probes = exit_layer, num_speculations, ()
    generated: list[int] = []
    pending, pos = prompt, 0
    while stopper.remaining(generated) > 0:
        if plan:
            E, d, probes = plan.choose(1)
        k = stopper.drafts(generated, d)
        t0 = clock()
        r, pos = run_round(stack, cache, pending, pos, k, exit_layer=E, params=params, generator=generator,
                           vocab=draft_vocab, confidence_threshold=confidence_threshold, timer=timer, probes=probes)
        if plan:  # the tokens are on the host: the clock reads the round's real time
            plan.observe_speed(E if d else auto.AR, 1, len(r.tokens), clock() - t0)
            plan.observe_round(E, r)
        emit, reason = stopper.accept(generated, r.tokens)
        stats.add_round(r.drafted, min(r.accepted, len(emit)), E, d)  # drafts cut by a stop never count as accepted
        generated += emit
        if on_tokens:
            on_tokens(emit)
        if reason:
            stats.stop_reason = reason
            break
        pending = prompt.new_tensor([[r.tokens[-1]]])
    return generated
