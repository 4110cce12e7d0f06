"""Token selection: logits processing, greedy / sampled choice, and speculative acceptance.

Terminology (vLLM's): for one round with k draft tokens d_1..d_k drawn from the draft distribution
q (the exit layer's), and k+1 target distributions p_1..p_{k+1} (the full model's, from one verify
pass), the "accepted" tokens are the longest prefix kept; the "recovered" token replaces the first
rejected draft; the "bonus" token follows when all k are accepted. Both greedy and sampled
acceptance emit exactly what the full model alone would (Leviathan et al. 2023; LayerSkip §4.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' order) on (..., V) logits."""
    if params.temperature != 1.0:
        # shifted first (softmax is unchanged): a tiny temperature then gives -inf, never inf - inf = nan
        logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if params.top_k is not None and 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (..., V)
        drop_sorted = cum - sorted_logits.softmax(-1) >= params.top_p  # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after warping."""
    return warp(logits.float(), params).softmax(-1)


def select(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Pick one token per row of (B, V) logits. Returns (tokens (B, 1), probs (B, V) or None)."""
    if not params.do_sample:
        return logits.argmax(-1, keepdim=True), None
    probs = probabilities(logits, params)
    return torch.multinomial(probs, 1, generator=generator), probs


def greedy_accept(drafts: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """drafts (k,), target (k+1,) argmax tokens of the verifier -> (num accepted a, next token).

    The next token is the verifier's own at the first mismatch (or the bonus token at k).
    """
    k = drafts.shape[0]
    a = int((drafts == target[:k]).cumprod(0).sum()) if k else 0
    return a, int(target[a])


def speculative_accept(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling over one round.

    Args:
        drafts: (k,) draft tokens, d_i ~ q_i.
        q: (k, V) draft probabilities. p: (k+1, V) target probabilities.
    Returns:
        (a, next): d_1..d_a accepted (each with probability min(1, p_i(d_i) / q_i(d_i)), in order),
        then `next` ~ norm(max(p_{a+1} - q_{a+1}, 0)) after a rejection, or ~ p_{k+1} when all pass.
    """
    k = drafts.shape[0]
    if k:
        idx = torch.arange(k, device=drafts.device)
        ratio = p[idx, drafts] / q[idx, drafts]  # (k,)
        u = torch.rand(k, generator=generator, device=p.device)
        a = int((u < ratio).cumprod(0).sum())
    else:
        a = 0
    if a < k:
        residual = (p[a] - q[a]).clamp_min(0)  # (V,)
        dist = residual if float(residual.sum()) > 0 else p[a]
    else:
        dist = p[k]
    return a, int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
