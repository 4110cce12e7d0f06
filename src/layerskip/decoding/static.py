"""The static-shape decode path (`generate(..., compile=True)`, `--compile`): one fixed-shape function per round,
compiled, and on a GPU captured as a CUDA graph and replayed every round.

Why: an eager layer loop pays Python and one kernel launch per operation; on a GPU a small model's step is bound by
that, not by the GPU (docs/benchmarks.md). Fixed shapes and fixed addresses let torch.compile fuse the pointwise
work and let a CUDA graph replay a whole round as one launch.

Layout (terminology as in self_speculative.py: exit layer E, d speculations, x0 the pending token):
  buffers   one KVCache of `capacity` positions for `rows` rows (every layer), and device tensors holding each
            row's pending token `x0` (B, 1), its position `pos` (B,) and whether it is still decoding `active`
            (B,). They are allocated once and updated in place: a captured graph reads them at fixed addresses.
  a round   `_round` (self-speculative): d draft steps (B, 1) through [0, E) and the (draft) head, the last draft
            through [0, E), one verify pass (B, d + 1) through [E, L) on the exit hidden states, greedy acceptance,
            then x0 and pos moved on, all on the device. It returns (B, d + 2): the verifier's d + 1 tokens and
            the accepted count a; row b emits the first a + 1. Reading that tensor is the round's one host sync.
  a step    `_step` (autoregressive and early exit): x0 through [0, n) and the head; returns (B, 1).
  attention every pass attends over the whole cache (`LayerStack.run(..., whole_cache=True)`), positions past a row's
            own masked, so no shape depends on how far decoding has got. What a round writes past the accepted
            tokens (rejected drafts) is never visible and is overwritten before it could be.
  prefill   the prompts go through every layer once, eagerly (their lengths vary), into the same cache; the
            verifier's first token comes from it.
  rows      a batch decodes in lockstep rounds; a finished row stays in the batch (the shapes are fixed), frozen:
            `active` stops its position moving, and its output is no longer read. The capacity (the longest
            prompt + max_new_tokens + d + 1) bounds every write.
Lossless: the verifier alone decides what is emitted, so greedy output equals autoregressive output (fp32; tests/
test_static.py checks it against the eager path on every architecture). Greedy only: sampling, the confidence
threshold (a data-dependent draft length) and exit_layer "auto" run on the eager path, and asking for them with
compile=True is an error (decoding/config.py).

Decoders are kept on the engine (`LayerStack.static_decoders`, by shape and settings) so that a second `generate`
with the same shape replays what the first compiled; the first pays the compile / capture (stats.compile_s, not
part of total_s).
"""
from __future__ import annotations

import time

import torch

from layerskip.decoding.batch import Row, _block, _finish
from layerskip.forward import LayerStack, exit_logits

CAPACITY_STEP = 256  # capacities are rounded up to a multiple of this, so nearby lengths share a compiled decoder
WARMUP_CALLS = 3  # calls before a CUDA graph is captured (compile, autotuning, allocator warm-up)
MAX_DECODERS = 64  # compiled decoders one process may hold (torch.compile's own limit is 8 per function)


class StaticDecoder:
    """Fixed-shape buffers and the compiled (and, on a GPU, captured) round or step for one set of settings.

    Args:
        stack: the engine (its model's weights are used in place; this decoder runs its own plain-matmul view).
        rows: the batch size B. capacity: positions per row (prompt + new tokens + d + 1 at most).
        num_layers: E for self-speculative decoding and early exit, L for autoregressive decoding.
        num_speculations: d for self-speculative decoding, None for a step.
        vocab: the draft vocabulary (token ids) or None.
        compile: run the round through torch.compile (fullgraph, static shapes): True (inductor), a backend's
            name (tests trace with "eager"), or False. graphs: capture it as a CUDA graph (default: on a CUDA
            device).
    """

    def __init__(self, stack: LayerStack, *, rows: int, capacity: int, num_layers: int,
                 num_speculations: int | None, vocab: torch.Tensor | None = None, compile: bool | str = True,
                 graphs: bool | None = None):
        # plain F.linear: the few-row CPU kernels (kernels.py) pick by row count on the host, the compiler its own
        self.stack = engine = LayerStack(stack.model, "linear")
        self.rows, self.capacity = rows, capacity
        self.num_layers, self.num_speculations = num_layers, num_speculations
        device = engine.device
        self.cache = engine.new_cache(capacity, batch=rows,
                                      num_layers=None if num_speculations is not None else num_layers)
        self.x0 = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.active = torch.ones(rows, dtype=torch.long, device=device)
        head = engine.lm_head
        self.vocab = vocab
        self.draft_weight = head.weight if vocab is None else head.weight[vocab].contiguous()
        self.draft_bias = None if head.bias is None or vocab is None else head.bias[vocab]
        fn = self._step if num_speculations is None else self._round
        backend = "inductor" if compile is True else compile
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend) if compile else fn
        self.graphs = device.type == "cuda" if graphs is None else graphs
        self.graph = self.graph_out = None
        self.compile_s: float | None = None  # the first call's warm-up (compile, capture), once

    # ---- the fixed-shape functions (traced by torch.compile; no host sync, no Python branch on data) ----
    def _logits(self, h, weight, bias):
        return exit_logits(h, self.stack.norm, weight, bias)

    def _draft(self, h):
        """(B, 1, H) exit hidden states -> the draft tokens (B, 1)."""
        best = self._logits(h[:, -1], self.draft_weight, self.draft_bias).argmax(-1, keepdim=True)
        return best if self.vocab is None else self.vocab[best]

    def _step(self) -> torch.Tensor:
        s = self.stack
        h = s.run(s.embed(self.x0), 0, self.num_layers, self.cache, self.pos, whole_cache=True)
        nxt = self._logits(h[:, -1], s.lm_head.weight, s.lm_head.bias).argmax(-1, keepdim=True)  # (B, 1)
        self.x0.copy_(nxt)
        self.pos.add_(self.active)
        return nxt

    def _round(self) -> torch.Tensor:
        s, E, d = self.stack, self.num_layers, self.num_speculations
        token, exits, drafts = self.x0, [], []
        for i in range(d):
            h = s.run(s.embed(token), 0, E, self.cache, self.pos + i, whole_cache=True)  # (B, 1, H)
            exits.append(h)
            token = self._draft(h)
            drafts.append(token)
        exits.append(s.run(s.embed(token), 0, E, self.cache, self.pos + d, whole_cache=True))
        h = s.run(torch.cat(exits, 1), E, s.num_layers, self.cache, self.pos, whole_cache=True)  # (B, d + 1, H)
        target = self._logits(h, s.lm_head.weight, s.lm_head.bias).argmax(-1)  # (B, d + 1)
        agree = (torch.cat(drafts, 1) == target[:, :d]).long()  # (B, d)
        accepted = agree.cumprod(1).sum(1)  # (B,): the longest agreeing prefix
        self.x0.copy_(target.gather(1, accepted[:, None]))
        self.pos.add_((accepted + 1) * self.active)
        return torch.cat([target, accepted[:, None]], 1)  # (B, d + 2)

    # ---- running it ----------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compile (and capture) once, on whatever the buffers hold: what it writes into the cache lies at
        positions that prefill or later passes overwrite before any query sees them. Returns its seconds."""
        if self.compile_s is not None:
            return 0.0
        device = self.stack.device
        t0 = time.perf_counter()
        with _room_to_compile():
            self._warm_up(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def _warm_up(self, device) -> None:
        if self.graphs:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.fn()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_out = self.fn()
            self.graph.replay()
        else:
            self.fn()

    def call(self) -> list[list[int]]:
        """One round (or step) on the buffers; its output on the host (the one sync)."""
        if self.graph is not None:
            self.graph.replay()
            return self.graph_out.tolist()
        return self.fn().tolist()

    def prefill(self, rows: list[Row]) -> list[int]:
        """The prompts through every layer (eagerly, right-padded), into the cache; each row's first token.
        Sets x0, pos and active for the rounds."""
        s = self.stack
        if len(rows) != self.rows:
            raise ValueError(f"prefill: {len(rows)} rows for a decoder of {self.rows}")
        block = _block([r.pending for r in rows], s.device)  # (B, W)
        lengths = torch.tensor([len(r.pending) for r in rows], device=s.device)
        start = torch.zeros(self.rows, dtype=torch.long, device=s.device)
        depth = s.num_layers if self.num_speculations is not None else self.num_layers  # early exit: [0, E) only
        h = s.run(s.embed(block), 0, depth, self.cache, start)  # (B, W, H)
        last = h[torch.arange(self.rows, device=s.device), lengths - 1]  # (B, H)
        first = self._logits(last, s.lm_head.weight, s.lm_head.bias).argmax(-1)  # (B,)
        self.x0.copy_(first[:, None])
        self.pos.copy_(lengths)
        self.active.fill_(1)
        return first.tolist()

    def freeze(self, done: list[bool]) -> None:
        """Rows that finished stop moving (their writes stay in bounds)."""
        self.active.copy_(torch.tensor([0 if x else 1 for x in done], device=self.active.device))


def _room_to_compile():
    """torch.compile keeps at most `recompile_limit` (8) compiled versions of one function, then runs it eagerly:
    every decoder compiles the same method for its own buffers and settings, so a long-lived engine (a benchmark of
    many contenders) needs more. Raised only while a decoder compiles."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    return dynamo.patch(**{name: max(getattr(dynamo, name), MAX_DECODERS)})


def capacity_for(prompt_lengths: list[int], max_new_tokens: int, num_speculations: int | None) -> int:
    """Positions a row may write: the longest prompt, the new tokens, one round's overshoot; rounded up."""
    need = max(prompt_lengths) + max_new_tokens + (num_speculations or 0) + 1
    return -(-need // CAPACITY_STEP) * CAPACITY_STEP


def static_decoder(stack: LayerStack, *, rows: int, capacity: int, num_layers: int, num_speculations: int | None,
                   vocab: torch.Tensor | None, compile: bool | str = True, graphs: bool | None = None) -> StaticDecoder:
    """The engine's decoder for these settings, made (and warmed up) on first use."""
    key = (rows, capacity, num_layers, num_speculations, None if vocab is None else tuple(vocab.tolist()),
           compile, graphs)
    decoder = stack.static_decoders.get(key)
    if decoder is None:
        decoder = stack.static_decoders[key] = StaticDecoder(
            stack, rows=rows, capacity=capacity, num_layers=num_layers, num_speculations=num_speculations,
            vocab=vocab, compile=compile, graphs=graphs)
    return decoder


def decode_static(decoder: StaticDecoder, rows: list[Row], on_tokens=None) -> None:
    """Greedy decoding of `rows` (each holding its prompt in `pending`) on the static path, in place: each row's
    `generated`, `stats` and `done`. on_tokens(row index, ids) as in decode_batch."""
    d = decoder.num_speculations
    speculative = d is not None
    for row, token in zip(rows, decoder.prefill(rows)):
        _finish(row, [token], on_tokens)
        if speculative:  # the prompt's pass is one ordinary step, split nowhere: a round that drafted nothing
            row.stats.add_round(0, 0, decoder.num_layers, 0)
        else:
            row.stats.rounds += 1
    done = [r.done for r in rows]
    if any(done):
        decoder.freeze(done)
    while not all(done):
        room = [r.stopper.remaining(r.generated) for r in rows]
        out = decoder.call()
        for b, row in enumerate(rows):
            if row.done:
                continue
            if speculative:
                a = out[b][-1]
                before = len(row.generated)
                _finish(row, out[b][:a + 1], on_tokens)
                # counted as the eager path counts: k = min(d, room - 1) drafts, of them only emitted ones accepted
                k = min(d, room[b] - 1)
                row.stats.add_round(k, min(a, len(row.generated) - before, k), decoder.num_layers, d)
            else:
                _finish(row, out[b], on_tokens)
                row.stats.rounds += 1
        now = [r.done for r in rows]
        if now != done:
            done = now
            decoder.freeze(done)
