"""Batched decoding: many prompts at once, every strategy, with ragged self-speculative acceptance.

Terminology as in self_speculative.py (exit layer E, d speculations, k drafts, a accepted). A batch row is one
prompt; rows accept different numbers of drafts, so after a round they sit at different lengths.

Design: pad and mask, one cache (BASS-PAD, Qian et al. 2024).
  cache    one KVCache (B, H_kv, S, D) per layer. Row b's accepted sequence fills positions [0, pos[b]) of its
           cache row in every layer it has run through; its pending tokens go at [pos[b], ...). Validity is per
           row and kept here (`Row.pos`), not in the cache: whatever lies past pos[b] (rejected drafts, padding)
           is never visible to row b's queries and is overwritten before it could be.
  a pass   feeds a (B, W) block: row b's n_b real tokens first, at positions [pos[b], pos[b] + n_b), then padding
           at the positions after them. Rotary positions are per row, and the attention mask is causal on each
           row's own positions (forward.LayerStack.run with a tensor `pos`), so row b computes exactly what it
           would alone; padding's K/V is garbage that no real query sees.
  a round  every active row drafts up to its own k (d, fewer near its max_new_tokens, or fewer where its
           confidence threshold stops it); each draft step is one (B, 1) pass through [0, E) for the rows still
           drafting (the others feed padding); then one verify pass of every row's exit hidden states through
           [E, L); each row accepts its own prefix and adds its own verifier token, and moves its own pos.
  leaving  a finished row leaves the batch at once: the cache keeps only the active rows (KVCache.keep_rows, one
           copy of the cache per finishing round), so it stops costing matmul rows and attention. Masking it
           instead would keep paying for it every step until the longest row ends.
Guarantee: row b's greedy output equals decoding prompt b alone (`generate(model, prompt_b)`), token for token in
fp32, whatever the other rows do; sampled rows use the same acceptance rule per row, with generator seed + b.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerskip.decoding.result import GenerationStats
from layerskip.decoding.sampling import SamplingParams, probabilities, select
from layerskip.decoding.self_speculative import Round, draft_token
from layerskip.decoding.self_speculative import accept as accept_round
from layerskip.decoding.self_speculative import Draft
from layerskip.decoding.stopping import StopChecker
from layerskip.forward import LayerStack

PAD_ID = 0  # the token fed where a row has nothing to feed; its K/V is never visible


@dataclass
class Row:
    """One prompt's state in the batch."""

    index: int  # its place in the caller's list
    pending: list[int]  # fed next (the prompt at first, then the last emitted token)
    stopper: StopChecker
    stats: GenerationStats
    generator: torch.Generator | None
    pos: int = 0  # positions [0, pos) of its cache row hold its accepted sequence
    generated: list[int] = field(default_factory=list)
    done: bool = False


def _block(seqs: list[list[int]], device) -> torch.Tensor:
    """Right-padded (B, W) token ids of the rows' sequences (W = the longest)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD_ID] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def _positions(rows: list[Row], device, offsets=None) -> torch.Tensor:
    return torch.tensor([r.pos + (offsets[i] if offsets else 0) for i, r in enumerate(rows)], device=device)


def _finish(row: Row, tokens: list[int], on_tokens) -> None:
    emit, reason = row.stopper.accept(row.generated, tokens)
    row.generated += emit
    if on_tokens and emit:
        on_tokens(row.index, emit)
    if reason:
        row.stats.stop_reason, row.done = reason, True


def _leave(cache, rows: list[Row]) -> list[Row]:
    """Drop finished rows from the batch and from the cache."""
    keep = [i for i, r in enumerate(rows) if not r.done]
    if len(keep) < len(rows) and keep:
        cache.keep_rows(torch.tensor(keep, device=cache.keys[0].device))
    return [rows[i] for i in keep]


def decode_batch(stack: LayerStack, rows: list[Row], *, strategy: str, exit_layer: int | None,
                 num_speculations: int | None, params: SamplingParams, draft_vocab: torch.Tensor | None = None,
                 confidence_threshold: float = 0.0, on_tokens=None) -> None:
    """Decode every row to its stop (each with max_new_tokens >= 1); fills each row's `generated` and `stats`.

    on_tokens(row index, ids) is called with what each row emits, as it emits it.
    """
    longest = max(len(r.pending) for r in rows) + max(r.stopper.max_new_tokens for r in rows)
    # room for every row's longest pass: its padding may reach d + 1 positions past its own last token
    cache = stack.new_cache(longest + (num_speculations or 0) + 1, batch=len(rows))
    while rows:
        if strategy == "self_speculative":
            _speculative_round(stack, cache, rows, exit_layer, num_speculations, params, draft_vocab,
                               confidence_threshold, on_tokens)
        else:
            _step(stack, cache, rows, exit_layer or stack.num_layers, params, on_tokens)
        rows = _leave(cache, rows)


def _step(stack: LayerStack, cache, rows: list[Row], num_layers: int, params: SamplingParams, on_tokens) -> None:
    """One autoregressive (or early-exit) step for every row: each row's pending tokens through [0, num_layers)."""
    counts = [len(r.pending) for r in rows]
    h = stack.run(stack.embed(_block([r.pending for r in rows], stack.device)), 0, num_layers, cache,
                  _positions(rows, stack.device))  # (B, W, H)
    last = h[torch.arange(len(rows)), torch.tensor(counts) - 1]  # (B, H): each row's last real position
    logits = stack.logits(last)  # (B, V)
    if params.do_sample:  # each row from its own generator, as it would alone
        tokens = [int(select(logits[b:b + 1], params, r.generator)[0]) for b, r in enumerate(rows)]
    else:
        tokens = logits.argmax(-1).tolist()
    for r, n, t in zip(rows, counts, tokens):
        r.stats.rounds += 1
        r.pos += n
        r.pending = [t]
        _finish(r, [t], on_tokens)


def _speculative_round(stack: LayerStack, cache, rows: list[Row], E: int, d: int, params: SamplingParams,
                       vocab, threshold: float, on_tokens) -> None:
    """One self-speculative round for every row (see the module docstring)."""
    B, device = len(rows), stack.device
    counts = [len(r.pending) for r in rows]  # n_b
    limits = [min(d, r.stopper.remaining(r.generated) - 1) for r in rows]  # k_b at most: room for the verifier
    h = stack.run(stack.embed(_block([r.pending for r in rows], device)), 0, E, cache, _positions(rows, device))
    exits = [[h[b, :counts[b]]] for b in range(B)]  # each row's exit hidden states, in order
    current = h[torch.arange(B), torch.tensor(counts) - 1]  # (B, H): where each row drafts from
    drafts, probs = [[] for _ in rows], [[] for _ in rows]
    fed = [0] * B  # drafts already through [0, E)
    drafting = [k > 0 for k in limits]
    while any(drafting):
        logits = stack.logits(current, vocab)  # (B, V')
        feed = [None] * B
        for b, r in enumerate(rows):
            if not drafting[b]:
                continue
            token, q = draft_token(logits[b:b + 1], params, r.generator, vocab, threshold, stack.vocab_size)
            if token is None:  # not confident enough: this row's drafting ends here
                drafting[b] = False
                continue
            drafts[b].append(int(token))
            probs[b].append(q)
            if len(drafts[b]) < limits[b]:
                feed[b] = int(token)  # it may draft again: its new token goes through [0, E) now
            else:
                drafting[b] = False  # the verify pass feeds its last draft
        if not any(f is not None for f in feed):
            break
        step_ids = torch.tensor([[PAD_ID if f is None else f] for f in feed], device=device)  # (B, 1)
        h1 = stack.run(stack.embed(step_ids), 0, E, cache, _positions(rows, device, [n + f for n, f in zip(counts, fed)]))
        for b in range(B):
            if feed[b] is not None:
                exits[b].append(h1[b])
                fed[b] += 1
        moved = torch.tensor([f is not None for f in feed], device=device)[:, None]  # (B, 1)
        current = torch.where(moved, h1[:, 0], current)  # (B, H)
    # verify: the last drafts not yet through [0, E), then every row's exit states through [E, L)
    unfed = [b for b in range(B) if len(drafts[b]) > fed[b]]
    if unfed:
        last = [drafts[b][-1] if b in unfed else PAD_ID for b in range(B)]
        h1 = stack.run(stack.embed(torch.tensor(last, device=device)[:, None]), 0, E, cache,
                       _positions(rows, device, [n + f for n, f in zip(counts, fed)]))
        for b in unfed:
            exits[b].append(h1[b])
    seqs = [torch.cat(e, 0) for e in exits]  # row b: (n_b + k_b, H)
    width = max(s.shape[0] for s in seqs)
    block = torch.stack([torch.cat([s, s.new_zeros(width - s.shape[0], s.shape[1])]) for s in seqs])  # (B, W, H)
    h = stack.run(block, E, stack.num_layers, cache, _positions(rows, device))  # (B, W, H)
    wanted = torch.cat([h[b, counts[b] - 1:counts[b] + len(drafts[b])] for b in range(B)])  # (sum k_b + 1, H)
    logits = stack.logits(wanted).split([len(t) + 1 for t in drafts])  # row b: (k_b + 1, V)
    for b, r in enumerate(rows):
        tokens = torch.tensor(drafts[b], dtype=torch.long, device=device)
        q = torch.cat(probs[b], 0) if params.do_sample and drafts[b] else None
        a, nxt = accept_round(Draft(tokens, q, seqs[b][None], r.pos, counts[b]), logits[b], params, r.generator)
        result = Round(len(drafts[b]), a, drafts[b][:a] + [nxt])
        before = len(r.generated)
        r.pos += counts[b] + a  # rollback: the row keeps x0 and its accepted drafts
        r.pending = [nxt]
        _finish(r, result.tokens, on_tokens)
        r.stats.add_round(result.drafted, min(a, len(r.generated) - before))
