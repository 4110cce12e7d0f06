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
  joining  rows join a running batch between steps (`Batch.add`; `decode_batch` adds them all at once, a server
           as requests arrive): their prompts but the last token go through the strategy's layers as one ragged
           block of their own, into cache rows appended to the batch's; each then holds one pending token, like
           every running row, so a pass is never padded to a prompt's width.
  a round  every active row drafts up to its own k (d, fewer near its max_new_tokens, or fewer where a draft's
           top probability falls below ROW_THRESHOLD x the confidence threshold C: in a batch a draft costs its
           row of a pass, not the whole pass that C weighs at batch 1); each draft step is one (B, 1) pass
           through [0, E) for the rows still drafting (the others feed padding). With a confidence threshold,
           drafting also ends for the whole batch where the next drafts' expected accepted tokens no longer pay
           for the pass that would feed them (`_worth_a_pass`). Then one verify pass of every row's exit hidden
           states through [E, L), the rows packed (a row that drafted less adds no padding to the matmuls); each
           row accepts its own prefix and adds its own verifier token, and moves its own pos.
  leaving  a finished row leaves the batch at once: the cache keeps only the active rows (KVCache.keep_rows, one
           copy of the cache per finishing round), so it stops costing matmul rows and attention. Masking it
           instead would keep paying for it every step until the longest row ends.
  one row  a batch of one row takes batch 1's own step and round (autoregressive.step,
           self_speculative.run_round): the same tokens with plain positions and none of the batch's bookkeeping,
           so a server's lone request decodes as fast as `generate`.
Guarantee: row b's greedy output equals decoding prompt b alone (`generate(model, prompt_b)`), token for token in
fp32, whatever the other rows do or when it joined; sampling parameters are per row, and sampled rows use the
same acceptance rule per row, each with its own generator (`generate` seeds row b with seed + b).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

import torch

from layerskip.decoding import auto
from layerskip.decoding.autoregressive import step
from layerskip.decoding.result import GenerationStats
from layerskip.decoding.sampling import SamplingParams, select
from layerskip.decoding.self_speculative import Round, draft_token, run_round
from layerskip.decoding.self_speculative import accept as accept_round
from layerskip.decoding.self_speculative import Draft
from layerskip.decoding.stopping import StopChecker
from layerskip.forward import LayerStack

PAD_ID = 0  # the token fed where a row has nothing to feed; its K/V is never visible


@dataclass
class Row:
    """One prompt's state in the batch."""

    index: object  # the caller's key: its place in the caller's list, or a server's request id
    pending: list[int]  # fed next (the prompt at first, then the last emitted token)
    stopper: StopChecker
    stats: GenerationStats
    params: SamplingParams  # greedy or sampling, per row
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


def _finish(row: Row, tokens: list[int], on_tokens) -> int:
    """`tokens` emitted for the row as far as its stop rules let them; returns how many it kept."""
    emit, reason = row.stopper.accept(row.generated, tokens)
    row.generated += emit
    if on_tokens and emit:
        on_tokens(row.index, emit)
    if reason:
        row.stats.stop_reason, row.done = reason, True
    return len(emit)


def _emit(row: Row, pos: int, tokens: list[int], on_tokens) -> int:
    """A step's or round's outcome for one row: its accepted sequence now ends at `pos`, and `tokens` are
    emitted (`_finish`), the last one pending, to be fed next. Returns how many of them the row kept."""
    row.pos, row.pending = pos, [tokens[-1]]
    return _finish(row, tokens, on_tokens)


class Batch:
    """A running batch under one decoding plan: rows join (`add`), every row advances by one step or round
    (`step`), and finished rows leave. `decode_batch` runs one to its end; a server adds rows between steps.

    Args:
        strategy, exit_layer, num_speculations, draft_vocab, confidence_threshold: what every row shares.
            exit_layer "auto": one AutoPlan (decoding/auto.py) chooses E and d for every round from all rows'
            acceptance and the batch's size, or an autoregressive step where no round pays (num_speculations:
            the longest draft, None: auto's cap).
        max_rows: the most rows the batch will hold (auto times its pass costs up to that many; default: the
            rows of its first step).
        on_tokens(row index, ids): called with what each row emits, as it emits it.
        speculate_up_to: self-speculative only: run rounds while the batch has at most this many rows, and
            autoregressive steps through every layer above it (None: always rounds). Lossless either way: both
            leave every row with its accepted sequence in its cache row and one pending token. Where a verify
            pass of B(k+1) rows is compute-bound, rounds stop paying past a few rows (docs/benchmarks.md).
            A sampled row keeps the full model's distribution, but its random stream then depends on when it
            took steps rather than rounds: a seed no longer reproduces its batch-1 output.
    """

    def __init__(self, stack: LayerStack, *, strategy: str, exit_layer: int | str | None,
                 num_speculations: int | None, draft_vocab: torch.Tensor | None = None,
                 confidence_threshold: float = 0.0, on_tokens=None, speculate_up_to: int | None = None,
                 max_rows: int | None = None):
        self.speculate_up_to = speculate_up_to
        self.stack, self.strategy, self.exit_layer = stack, strategy, exit_layer
        self.num_speculations, self.draft_vocab = num_speculations, draft_vocab
        self.auto = strategy == "self_speculative" and exit_layer == auto.AUTO
        if self.auto:  # one plan for the batch: E and d per round from every row's acceptance
            self.num_speculations = num_speculations or auto.MAX_SPECULATIONS
        self.max_rows, self.plan = max_rows, None
        self.confidence_threshold, self.on_tokens = confidence_threshold or 0.0, on_tokens
        self.rows: list[Row] = []
        self.cache = None

    def __len__(self) -> int:
        return len(self.rows)

    def _room(self, row: Row) -> int:
        """Positions row needs: its prompt, its new tokens, and a pass's padding past its last token (d + 1)."""
        return row.pos + len(row.pending) + row.stopper.remaining(row.generated) + (self.num_speculations or 0) + 1

    def add(self, rows: list[Row]) -> None:
        """Join new rows (each with its whole prompt pending and max_new_tokens >= 1).

        Their prompts but the last token go through the layers the strategy runs, as one ragged block of their
        own (the running rows wait one pass, not one pass per joiner); then each joins with one pending token,
        like every running row, so no later pass is padded to a prompt's width. Their cache rows are appended to
        the batch's (one copy of the cache per join, as one per leave).
        """
        if not rows:
            return
        stack = self.stack
        size = max(map(self._room, rows + self.rows))
        cache = stack.new_cache(size, batch=len(rows))
        prefix = [r.pending[:-1] for r in rows]
        if any(prefix):  # packed: prompts of different lengths multiply no padding
            layers = self.exit_layer if self.strategy == "early_exit" else stack.num_layers
            ids = torch.tensor([t for p in prefix for t in p], dtype=torch.long, device=stack.device)
            stack.run(stack.embed(ids), 0, layers, cache, _positions(rows, stack.device),
                      lengths=[len(p) for p in prefix])
        for r, p in zip(rows, prefix):
            r.pos, r.pending = r.pos + len(p), r.pending[-1:]
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.append_rows(cache)
        self.rows += rows

    def step(self) -> list[Row]:
        """One step (autoregressive, early exit) or round (self-speculative) for every row; returns the rows that
        finished in it, which have left the batch."""
        rounds = self.speculate_up_to is None or len(self.rows) <= self.speculate_up_to
        if self.auto and rounds:
            if self.plan is None:
                self.plan = auto.new_plan(self.stack, self.draft_vocab, start=auto.stored_exit_layer(self.stack),
                                          max_speculations=self.num_speculations,
                                          max_rows=max(self.max_rows or 0, len(self.rows)),
                                          threshold=self.confidence_threshold)
            E, k, probes = self.plan.choose(len(self.rows))
            t0, before = time.perf_counter(), sum(len(r.generated) for r in self.rows)
            if k:
                done, shadow = _round(self.stack, self.cache, self.rows, E, k, self.draft_vocab,
                                      self.confidence_threshold, self.on_tokens, probes)
                for r in done:
                    self.plan.observe_round(E, r)
                self.plan.observe_shadow(shadow)
            else:
                _step(self.stack, self.cache, self.rows, self.stack.num_layers, self.on_tokens)
            emitted = sum(len(r.generated) for r in self.rows) - before
            self.plan.observe_speed(E if k else auto.AR, len(self.rows), emitted, time.perf_counter() - t0)
        elif self.strategy == "self_speculative" and rounds:
            _round(self.stack, self.cache, self.rows, self.exit_layer, self.num_speculations, self.draft_vocab,
                   self.confidence_threshold, self.on_tokens)
        else:
            layers = self.exit_layer if self.strategy == "early_exit" else self.stack.num_layers
            _step(self.stack, self.cache, self.rows, layers, self.on_tokens)
        return self.leave(lambda r: r.done)

    def leave(self, gone) -> list[Row]:
        """Drop the rows for which gone(row) holds (finished, or a server's cancelled requests) from the batch and
        its cache; returns them."""
        keep = [i for i, r in enumerate(self.rows) if not gone(r)]
        if len(keep) == len(self.rows):
            return []
        left = [r for r in self.rows if gone(r)]
        if keep:
            self.cache.keep_rows(torch.tensor(keep, device=self.cache.keys[0].device))
        else:
            self.cache = None
        self.rows = [self.rows[i] for i in keep]
        return left


def decode_batch(stack: LayerStack, rows: list[Row], *, strategy: str, exit_layer: int | None,
                 num_speculations: int | None, draft_vocab: torch.Tensor | None = None,
                 confidence_threshold: float = 0.0, on_tokens=None) -> None:
    """Decode every row to its stop (each with max_new_tokens >= 1); fills each row's `generated` and `stats`.

    on_tokens(row index, ids) is called with what each row emits, as it emits it.
    """
    batch = Batch(stack, strategy=strategy, exit_layer=exit_layer, num_speculations=num_speculations,
                  draft_vocab=draft_vocab, confidence_threshold=confidence_threshold, on_tokens=on_tokens)
    batch.add(rows)
    while batch.rows:
        batch.step()


def _step(stack: LayerStack, cache, rows: list[Row], num_layers: int, on_tokens) -> None:
    """One autoregressive (or early-exit) step for every row: each row's pending tokens through [0, num_layers).
    A batch of one row takes batch 1's own step (autoregressive.step): the same tokens, with plain positions."""
    if len(rows) == 1:
        r = rows[0]
        token = int(step(stack, _alone(cache, r), _pending(r, stack.device), r.pos, num_layers, r.params,
                         r.generator))
        r.stats.rounds += 1
        _emit(r, r.pos + len(r.pending), [token], on_tokens)
        return
    counts = [len(r.pending) for r in rows]
    h = stack.run(stack.embed(_block([r.pending for r in rows], stack.device)), 0, num_layers, cache,
                  _positions(rows, stack.device))  # (B, W, H)
    last = h[torch.arange(len(rows)), torch.tensor(counts) - 1]  # (B, H): each row's last real position
    logits = stack.logits(last)  # (B, V)
    tokens = logits.argmax(-1).tolist()
    for b, r in enumerate(rows):  # sampled rows each from their own generator, as they would alone
        if r.params.do_sample:
            tokens[b] = int(select(logits[b:b + 1], r.params, r.generator)[0])
    for r, n, t in zip(rows, counts, tokens):
        r.stats.rounds += 1
        _emit(r, r.pos + n, [t], on_tokens)


def _greedy_drafts(logits: torch.Tensor, vocab: torch.Tensor | None,
                   threshold: float) -> tuple[list[int | None], list[float]]:
    """Every row's greedy draft from (B, V') draft logits at once (draft_token's greedy rule, vectorised): the
    argmax (mapped through the draft vocabulary), or None where its probability is below the threshold; and
    each row's top probability (what `_worth_a_pass` weighs; 1.0 without a threshold, where nothing weighs it)."""
    if threshold <= 0:
        top = logits.argmax(-1)  # (B,)
        return (top if vocab is None else vocab[top]).tolist(), [1.0] * logits.shape[0]
    p, top = torch.softmax(logits.float(), -1).max(-1)  # (B,), (B,)
    ids, p = torch.stack([(top if vocab is None else vocab[top]).to(p.dtype), p]).tolist()  # one sync; ids < 2^24
    return [int(t) if q >= threshold else None for t, q in zip(ids, p)], p


# What one more draft pass of a batch costs, in units of E / L of a full autoregressive step: the (B, 1) pass
# through [0, E) and the draft head (0.41-0.46 of a step for E / L = 3/8 at B = 4 on the 2-core CPU), and the
# verify rows it adds (about 0.03 of a step each): about 1.4 E / L. Paired in one process (benchmarks/
# batch_stop_ab.py) it and 1.0 are within noise of each other, both 1.2x-1.35x the rounds without the stop
# (docs/benchmarks.md).
PASS_COST = 1.4

# A batch row's own drafting ends on a draft whose top probability is below ROW_THRESHOLD x the confidence
# threshold C (at B = 1, below C itself). C weighs a draft against a whole pass through [0, E); in a batch the pass
# runs while the batch's drafts pay for it (`_worth_a_pass`), so one more draft of a row costs only its row of that
# pass and of the verify pass. Paired on HumanEval prompts 16-47 (stored E = 3, d = 8, C = 0.7, 1 thread), cuts
# of 0.1-0.4 beat C itself at B = 2, 4 and 8, and 0.25 (0.35 C) was the best at each (1.135x against 1.061x
# autoregressive at B = 4; docs/benchmarks.md).
ROW_THRESHOLD = 0.35


def _worth_a_pass(chances: list[float], rows: int, exit_share: float) -> bool:
    """Whether a batch's next greedy drafts are worth the pass that feeds them through [0, E).

    chances: for each row with a next draft, the chance that it is accepted, estimated as the product of the
    draft head's top probabilities over the row's drafts so far this round (the confidence threshold's own
    signal). exit_share: E / L. The pass costs about PASS_COST x exit_share of a full autoregressive step of the
    batch, and that step would give each of its `rows` rows a token: the drafts pay while their expected
    accepted tokens reach PASS_COST x exit_share x rows. Without this, one confident row keeps every other row
    of the batch waiting through its drafting, a pass at a time.
    """
    return sum(chances) >= PASS_COST * exit_share * rows


def _alone(cache, row: Row):
    """The batch's cache, readied for a batch-1 pass of its only row (decoding/self_speculative.py and
    autoregressive.py track validity in the cache): every layer holds the row's accepted sequence [0, pos)."""
    cache.valid = [row.pos] * cache.num_layers
    return cache


def _pending(row: Row, device) -> torch.Tensor:
    return torch.tensor([row.pending], dtype=torch.long, device=device)  # (1, P)


def _round(stack: LayerStack, cache, rows: list[Row], E: int, d: int, vocab, threshold: float, on_tokens,
           probes=()) -> tuple[list[Round], dict[int, list]]:
    """One self-speculative round for every row: `_speculative_round`, or for a batch of one row batch 1's own
    round (self_speculative.run_round, the same tokens with plain positions and none of the batch's
    bookkeeping; a server's lone request decodes as fast as `generate`). Returns as `_speculative_round` does."""
    if len(rows) > 1:
        return _speculative_round(stack, cache, rows, E, d, vocab, threshold, on_tokens, probes)
    r = rows[0]
    k = r.stopper.drafts(r.generated, d)
    out, pos = run_round(stack, _alone(cache, r), _pending(r, stack.device), r.pos, k, exit_layer=E,
                         params=r.params, generator=r.generator, vocab=vocab, confidence_threshold=threshold,
                         probes=probes)
    r.stats.add_round(out.drafted, min(out.accepted, _emit(r, pos, out.tokens, on_tokens)), E, d)
    return [replace(out, shadow={})], out.shadow


def _speculative_round(stack: LayerStack, cache, rows: list[Row], E: int, d: int, vocab, threshold: float,
                       on_tokens, probes=()) -> tuple[list[Round], dict[int, list]]:
    """One self-speculative round for every row (see the module docstring). Returns every row's Round and, for
    `probes` (exit layers, E among them, decoding/auto.py), their shadow outcomes over every row's verified
    positions."""
    B, device = len(rows), stack.device
    early = {e: [] for e in probes if e <= E}  # taps of the passes through [0, E) (E: their output)
    late = {e: [] for e in probes if e > E}  # taps of the verify pass through [E, L)
    tapped = {e: [[] for _ in rows] for e in early}  # each row's hidden states at e <= E, in order

    def keep(fed_rows) -> None:  # move this pass's early taps into the rows that fed a real token
        for e, t in early.items():
            h_e = t.pop()
            for b in fed_rows:
                tapped[e][b].append(h_e[b])

    counts = [len(r.pending) for r in rows]  # n_b
    limits = [r.stopper.drafts(r.generated, d) for r in rows]  # k_b at most
    h = stack.run(stack.embed(_block([r.pending for r in rows], device)), 0, E, cache, _positions(rows, device),
                  early)
    exits = [[h[b, :counts[b]]] for b in range(B)]  # each row's exit hidden states, in order
    for e, t in early.items():
        h_e = t.pop()
        for b in range(B):
            tapped[e][b].append(h_e[b, :counts[b]])
    current = h[torch.arange(B), torch.tensor(counts) - 1]  # (B, H): where each row drafts from
    drafts, probs = [[] for _ in rows], [[] for _ in rows]
    fed = [0] * B  # drafts already through [0, E)
    drafting = [k > 0 for k in limits]
    unsure = [False] * B  # row b's drafting ended on a draft below its confidence cut
    chance = [1.0] * B  # row b's estimated chance that its drafts so far are all accepted (_worth_a_pass)
    row_cut = threshold * ROW_THRESHOLD  # a greedy row's own confidence cut in a batch (B > 1 here)
    while any(drafting):
        logits = stack.logits(current, vocab)  # (B, V')
        feed = [None] * B
        greedy, top = _greedy_drafts(logits, vocab, row_cut)  # every row's greedy draft, one sync
        sampled = {b: draft_token(logits[b:b + 1], r.params, r.generator, vocab, threshold, stack.vocab_size)
                   for b, r in enumerate(rows) if drafting[b] and r.params.do_sample}
        nxt = {b: sampled[b] if b in sampled else (greedy[b], None) for b in range(B) if drafting[b]}
        if B > 1 and threshold > 0 and not any(t is not None for t, _ in sampled.values()) and \
                not _worth_a_pass([chance[b] * top[b] for b, (t, _) in nxt.items() if t is not None], B,
                                  E / stack.num_layers):
            break  # greedy drafts not worth their pass: every row's drafting ends (a sampled row's never does)
        for b, (token, q) in nxt.items():
            if token is None:  # not confident enough: this row's drafting ends here
                drafting[b], unsure[b] = False, True
                continue
            chance[b] *= top[b]
            drafts[b].append(int(token))
            probs[b].append(q)
            if len(drafts[b]) < limits[b]:
                feed[b] = int(token)  # it may draft again: its new token goes through [0, E) now
            else:
                drafting[b] = False  # the verify pass feeds its last draft
        if not any(f is not None for f in feed):
            break
        step_ids = torch.tensor([[PAD_ID if f is None else f] for f in feed], device=device)  # (B, 1)
        h1 = stack.run(stack.embed(step_ids), 0, E, cache,
                       _positions(rows, device, [n + f for n, f in zip(counts, fed)]), early)
        keep([b for b in range(B) if feed[b] is not None])
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
                       _positions(rows, device, [n + f for n, f in zip(counts, fed)]), early)
        keep(unfed)
        for b in unfed:
            exits[b].append(h1[b])
    seqs = [torch.cat(e, 0) for e in exits]  # row b: (n_b + k_b, H)
    sizes = [s.shape[0] for s in seqs]
    starts = [0, *itertools.accumulate(sizes)][:B]  # row b's first token in the packed rows
    # packed: rows whose drafting stopped early cost no padded rows in [E, L)
    h = stack.run(torch.cat(seqs), E, stack.num_layers, cache, _positions(rows, device), late, lengths=sizes)
    wanted = torch.cat([h[o + n - 1:o + n + len(t)] for o, n, t in zip(starts, counts, drafts)])  # (sum k_b + 1, H)
    logits = stack.logits(wanted).split([len(t) + 1 for t in drafts])  # row b: (k_b + 1, V)
    rounds = []
    for b, r in enumerate(rows):
        tokens = torch.tensor(drafts[b], dtype=torch.long, device=device)
        q = torch.cat(probs[b], 0) if r.params.do_sample and drafts[b] else None
        a, nxt = accept_round(Draft(tokens, q, seqs[b][None], r.pos, counts[b]), logits[b], r.params, r.generator)
        rounds.append(Round(len(drafts[b]), a, drafts[b][:a] + [nxt], unsure[b]))
        kept = _emit(r, r.pos + counts[b] + a, rounds[-1].tokens, on_tokens)  # rollback: x0 and accepted drafts
        r.stats.add_round(len(drafts[b]), min(a, kept), E, d)
    if not probes:
        return rounds, {}
    # probes: each row's positions x0 .. d_a (context confirmed by the verifier), the verifier's argmax the target
    spans = [(counts[b] - 1, counts[b] + rounds[b].accepted) for b in range(B)]
    hidden = {e: torch.cat([torch.cat(tapped[e][b], 0)[lo:hi] for b, (lo, hi) in enumerate(spans)]) for e in early}
    hidden.update({e: torch.cat([t[0][o + lo:o + hi] for o, (lo, hi) in zip(starts, spans)]) for e, t in late.items()})
    targets = torch.cat([logits[b][:rounds[b].accepted + 1].argmax(-1) for b in range(B)])
    return rounds, auto.shadow_outcomes(stack, hidden, targets, [hi - lo for lo, hi in spans], vocab, threshold)
