"""The cost model of self-speculative decoding: what speedup the per-step costs allow.

Terminology: L layers, exit layer E, k drafts in a round.
  t_E     one draft step: one token through layers [0, E) + final norm + LM head + argmax (the head
          restricted to the draft vocabulary when drafting uses one).
  t_v(k)  one verify pass: the last draft through [0, E), then layers [E, L) on k + 1 positions,
          norm + head on all k + 1.
  t_ar    one autoregressive step: one token through all L layers + norm + head + argmax.
  n̄       mean tokens emitted per round (accepted drafts + the verifier's own token).

  predicted speedup = n̄ · t_ar / (k · t_E + t_v(k))

Each time is measured in isolation with the decoding functions themselves (draft, verify, step) over
a KV cache holding `context_len` positions, so the prediction leaves out exactly the decode loop's
own overhead (token bookkeeping, stop checks, Python): measured / predicted says how much of the
ideal the loop delivers. With an i.i.d. per-token acceptance α, n̄ = (1 − α^(k+1)) / (1 − α)
(Leviathan et al. 2023). On a GPU t_v(k) ≈ t_ar for small k; on a CPU it grows with k.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from layerskip.decoding.api import attention_backends, prepare
from layerskip.decoding.autoregressive import step
from layerskip.decoding.sampling import SamplingParams
from layerskip.decoding.self_speculative import Draft, draft
from layerskip.decoding.self_speculative import verify as verify_pass
from layerskip.errors import LayerSkipError
from layerskip.runtime import interleaved_medians


@dataclass
class StepTimes:
    """Isolated per-step costs in seconds (medians over repeats)."""

    exit_layer: int
    context_len: int
    t_draft: float  # t_E
    t_ar: float
    t_verify: dict[int, float] = field(default_factory=dict)  # k -> t_v(k)
    t_exit: float | None = None  # one early-exit step: t_E over the full head (None: t_draft, no draft vocabulary)

    def verify_time(self, k: float) -> float:
        """t_v at a (possibly fractional, mean) k: linear between the measured neighbours."""
        lo, hi = math.floor(k), math.ceil(k)
        if lo not in self.t_verify or hi not in self.t_verify:
            raise KeyError(f"t_v not measured at k={lo} and k={hi}; have {sorted(self.t_verify)}")
        if lo == hi:
            return self.t_verify[lo]
        return self.t_verify[lo] + (k - lo) * (self.t_verify[hi] - self.t_verify[lo])

    def as_dict(self) -> dict:
        d = asdict(self)
        d["t_verify"] = {str(k): v for k, v in sorted(self.t_verify.items())}
        return d


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """n̄ = (1 − α^(k+1)) / (1 − α): mean tokens per round with i.i.d. acceptance α and k drafts."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(times: StepTimes, tokens_per_round: float, drafts_per_round: float) -> float:
    """n̄ · t_ar / (k̄ · t_E + t_v(k̄)); k̄ may be fractional (a run's mean drafts per round)."""
    cost = drafts_per_round * times.t_draft + times.verify_time(drafts_per_round)
    return tokens_per_round * times.t_ar / cost


def predicted_early_exit_speedup(times: StepTimes) -> float:
    """Early exit emits one token per draft-sized step (full head): t_ar / t_E."""
    return times.t_ar / (times.t_draft if times.t_exit is None else times.t_exit)


def measure_step_times(model, exit_layer: int, ks, *, context_len: int = 64, repeats: int = 15,
                       warmup: int = 3, draft_vocab: torch.Tensor | None = None) -> StepTimes:
    """Time t_E, t_ar and t_v(k) for each k in `ks`, each in isolation, with a cache of `context_len`.

    Every piece is the decoding code itself: a draft step is `self_speculative.draft` of one token, a verify pass
    `self_speculative.verify` of a `Draft` holding k drafts, an autoregressive step `autoregressive.step`. The
    pieces are timed in turn within each repetition (not one after the other), so a slow spell on a shared
    machine slows all of them alike and their ratios, which the predictions use, hold steadier.

    Args:
        model: a loaded supported transformers model, or its engine (`layerskip.prepare`).
        exit_layer: E, 1 <= E < L.
        ks: draft counts to time the verify pass at (each >= 0).
        context_len: positions already in the cache (e.g. a typical prompt + half the new tokens).
        repeats, warmup: timed and untimed repetitions per piece; the median is kept.
        draft_vocab: the draft vocabulary's token ids (a LongTensor on the model's device), or None: the draft
            step's head scores only these.
    Returns:
        StepTimes.
    """
    stack = prepare(model)
    L = stack.num_layers
    if not 1 <= exit_layer < L:
        raise LayerSkipError(f"exit_layer must be in [1, {L - 1}] for this {L}-layer model, got {exit_layer}")
    ks = sorted({int(k) for k in ks})
    max_k = max(ks, default=0)
    if stack.max_positions:
        context_len = max(1, min(context_len, stack.max_positions - max_k - 2))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stack.vocab_size, (1, context_len + max_k + 2), generator=gen).to(stack.device)
    cache = stack.new_cache(context_len + max_k + 2)
    T = context_len
    greedy = SamplingParams()
    x0 = ids[:, T:T + 1]  # (1, 1): the pending token of every piece, at position T

    with torch.inference_mode(), attention_backends(stack.device):
        stack.run(stack.embed(ids[:, :T]), 0, L, cache, 0)  # the context, in every layer
        # The exit hidden states of x0 and drafts d1..d_{max_k - 1} (= ids[T + 1:]); each verify pass takes the
        # first k of them, so every piece below writes the cache positions it touches with the same values.
        exits_all = stack.run(stack.embed(ids[:, T:T + max(max_k, 1)]), 0, exit_layer, cache, T)  # (1, max_k, H)

        def verify(k: int) -> None:
            if k == 0:  # no draft: x0 through [0, E) (the draft call), then [E, L)
                d = draft(stack, cache, x0, T, exit_layer, 0, greedy)
            else:
                d = Draft(ids[0, T + 1:T + 1 + k], None, exits_all[:, :k], T, 1)  # fed = k - 1
            verify_pass(stack, cache, d, exit_layer).argmax(-1)  # (k + 1,)

        # (name, piece, each layer's valid length before it): the round's state before verifying k drafts is
        # early layers holding x0, d1..d_{k-1} (T + k positions), late layers the context only.
        pieces = [("draft", lambda: draft(stack, cache, x0, T, exit_layer, 1, greedy, vocab=draft_vocab), [T] * L),
                  ("ar", lambda: step(stack, cache, x0, T, L, greedy), [T] * L)]
        if draft_vocab is not None:
            pieces.append(("exit", lambda: step(stack, cache, x0, T, exit_layer, greedy), [T] * L))
        pieces += [(k, lambda k=k: verify(k), [T + k] * exit_layer + [T] * (L - exit_layer)) for k in ks]
        times = _interleaved_medians(pieces, cache, repeats, warmup, stack)
        cache.restore([T] * L)
    return StepTimes(exit_layer=exit_layer, context_len=T, t_draft=times["draft"], t_ar=times["ar"],
                     t_verify={k: times[k] for k in ks}, t_exit=times.get("exit"))


def _interleaved_medians(pieces, cache, repeats: int, warmup: int, stack) -> dict:
    """runtime.interleaved_medians, each piece after restoring each layer's valid cache length `valid`."""
    return interleaved_medians([(name, fn, lambda v=valid: cache.restore(v)) for name, fn, valid in pieces],
                               repeats, warmup, stack.device)


@dataclass
class BatchStepTimes:
    """Per-pass costs in seconds for `batch` rows in lockstep (medians): what a batched round costs.

    t_draft: one (B, 1) draft step (layers [0, E) + head); t_verify: the last drafts through [0, E) then a
    (B, k + 1) pass through [E, L) + head; t_ar: one (B, 1) full step.
    """

    batch: int
    exit_layer: int
    num_speculations: int
    context_len: int
    t_draft: float
    t_verify: float
    t_ar: float

    def predicted_speedup(self, tokens_per_round: float, drafts_per_round: float) -> float:
        """Batched self-speculative over batched autoregressive throughput: n̄ t_ar(B) / (k̄ t_E(B) + t_v(B, k))."""
        return tokens_per_round * self.t_ar / (drafts_per_round * self.t_draft + self.t_verify)


def measure_batch_step_times(model, exit_layer: int, k: int, batch: int, *, context_len: int = 64,
                             repeats: int = 10, warmup: int = 2) -> BatchStepTimes:
    """Time a batched round's passes for `batch` rows at `context_len` (the batched engine's own forward,
    per-row positions and masks as in decoding/batch.py), each in isolation, interleaved per repetition."""
    stack = prepare(model)
    L = stack.num_layers
    if not 1 <= exit_layer < L:
        raise LayerSkipError(f"exit_layer must be in [1, {L - 1}] for this {L}-layer model, got {exit_layer}")
    T = context_len
    ids = torch.randint(0, stack.vocab_size, (batch, T + k + 2), generator=torch.Generator().manual_seed(0))
    ids = ids.to(stack.device)
    cache = stack.new_cache(T + k + 2, batch=batch)
    pos = torch.full((batch,), T, device=stack.device)  # (B,) every row at the same length

    def step(num_layers: int) -> None:
        h = stack.run(stack.embed(ids[:, T:T + 1]), 0, num_layers, cache, pos)  # (B, 1, H)
        stack.logits(h[:, -1]).argmax(-1)

    with torch.inference_mode(), attention_backends(stack.device):
        stack.run(stack.embed(ids[:, :T]), 0, L, cache, 0)  # the context, in every layer
        exits = stack.run(stack.embed(ids[:, T:T + k + 1]), 0, exit_layer, cache, pos)  # (B, k + 1, H)

        def verify() -> None:
            stack.run(stack.embed(ids[:, T + k:T + k + 1]), 0, exit_layer, cache, pos + k)  # the last drafts
            h = stack.run(exits, exit_layer, L, cache, pos)  # (B, k + 1, H)
            stack.logits(h.reshape(-1, h.shape[-1])).argmax(-1)

        valid = cache.snapshot()  # write_rows keeps no per-layer validity: the snapshot is only restored as is
        pieces = [("draft", lambda: step(exit_layer), valid), ("ar", lambda: step(L), valid),
                  ("verify", verify, valid)]
        times = _interleaved_medians(pieces, cache, repeats, warmup, stack)
    return BatchStepTimes(batch, exit_layer, k, T, times["draft"], times["verify"], times["ar"])
