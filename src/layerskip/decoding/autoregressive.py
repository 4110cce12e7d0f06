"""Autoregressive decoding: the baseline, and static early exit.

Early exit (LayerSkip §4.1) is autoregressive decoding through the first E layers only, followed by
the model's final norm and LM head: lossy, no verification. With E = L it is ordinary decoding.
One step (`step`) feeds the pending tokens (the prompt at first, then the last emitted token) through
layers [0, E) with the KV cache and picks the next token from the last position.
"""
from __future__ import annotations

import torch

from layerskip.decoding.result import GenerationStats, Timer
from layerskip.decoding.sampling import SamplingParams, select
from layerskip.decoding.stopping import StopChecker
from layerskip.forward import LayerStack


def step(stack: LayerStack, cache, pending: torch.Tensor, pos: int, num_layers: int, params: SamplingParams,
         generator=None) -> torch.Tensor:
    """pending (1, P) at `pos` through layers [0, num_layers) + norm + head -> the next token (1, 1).

    The cache afterwards: layers [0, num_layers) valid up to pos + P.
    """
    h = stack.run(stack.embed(pending), 0, num_layers, cache, pos)  # (1, P, H)
    token, _ = select(stack.logits(h[:, -1]), params, generator)  # (1, 1)
    return token


def decode_autoregressive(stack: LayerStack, prompt: torch.Tensor, *, num_layers: int, params: SamplingParams,
                          stopper: StopChecker, stats: GenerationStats, generator=None, on_tokens=None, cache=None,
                          timer: Timer | None = None) -> list[int]:
    """Decode with layers [0, num_layers) (num_layers = L: full model; E < L: early exit).

    Args:
        prompt: (1, T) token ids on the model's device.
        cache: a KVCache to use (tests inspect it afterwards); default: a new one.
        timer: time the prompt's forward pass into stats.prefill_s (one device synchronisation).
    Returns:
        the new token ids.
    """
    T = prompt.shape[1]
    cache = cache or stack.new_cache(T + stopper.max_new_tokens, num_layers=num_layers)
    generated: list[int] = []
    pending, pos = prompt, 0
    while stopper.remaining(generated) > 0:
        token = step(stack, cache, pending, pos, num_layers, params, generator)
        if timer and pos == 0:
            timer.lap("prefill_s")
        emit, reason = stopper.accept(generated, [int(token)])
        generated += emit
        stats.rounds += 1
        if on_tokens:
            on_tokens(emit)
        if reason:
            stats.stop_reason = reason
            break
        pos += pending.shape[1]
        pending = token
    return generated
