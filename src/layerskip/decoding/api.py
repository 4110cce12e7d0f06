"""`layerskip.generate`: one entry point for autoregressive, early-exit and self-speculative decoding.

`generate(model, input_ids, ...)` takes a loaded transformers model, or a `LayerStack` made once by
`prepare(model)`: the stack holds what is worth keeping between calls (rotary tables, the draft head's rows,
reordered weights, the few-row matmul kernels that `prepare(model, tune=True)` timed on this machine). Given a
bare model, `generate` builds an untuned stack for that call. Nothing is cached at module level.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerskip.decoding.autoregressive import decode_autoregressive
from layerskip.decoding.config import STRATEGIES, DecodeConfig, ResolvedConfig
from layerskip.decoding.result import GenerationResult, GenerationStats, Timer
from layerskip.decoding.self_speculative import decode_self_speculative
from layerskip.decoding.stopping import StopChecker
from layerskip.errors import LayerSkipError
from layerskip.forward import LayerStack
from layerskip.kernels import tune as tune_kernels

__all__ = ["STRATEGIES", "DecodeConfig", "generate", "prepare", "attention_backends"]


def prepare(model, *, tune: bool = False, kernel: str | None = None) -> LayerStack:
    """The engine for `model`, to reuse across `generate` calls.

    Args:
        tune: time the few-row matmul kernels on this model and machine first (CPU only; a few seconds for a
            135M model; see layerskip.kernels). The CLI does this.
        kernel: force one kernel for every row count instead (kernels.KERNELS).
    Returns:
        a LayerStack; `stack.kernels` is the choice, also recorded in each result's stats.
    """
    if isinstance(model, LayerStack):
        stack = model
    else:
        stack = LayerStack(model, kernel)
    if tune and kernel is None:
        tune_kernels(stack)
    return stack


def attention_backends(device: torch.device):
    """On CUDA, keep scaled_dot_product_attention off cuDNN's backend while decoding: with a key length
    that changes every step it pays milliseconds of host-side planning per call, far more than the attention
    itself. Flash / memory-efficient / math kernels do not."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _prompt_tensor(input_ids, device) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise LayerSkipError(f"input_ids must have shape [1, T] (batch size 1), got {list(input_ids.shape)}")
        if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise LayerSkipError(f"input_ids must be integer token ids, got a {ids.dtype} tensor")
    else:
        try:
            ids = torch.tensor([list(input_ids)], dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise LayerSkipError("input_ids must be a list of ints or a LongTensor of shape [1, T]") from None
    if ids.shape[1] == 0:
        raise LayerSkipError("the prompt is empty: give at least one token")
    return ids.to(device=device, dtype=torch.long)


def _streaming_callback(streamer, prompt: torch.Tensor):
    """Accept a callable(list[int]) or a transformers streamer (put/end); returns (on_tokens, finish)."""
    if streamer is None:
        return None, lambda: None
    if hasattr(streamer, "put"):
        streamer.put(prompt.cpu())  # transformers' protocol: the prompt first (TextStreamer(skip_prompt=True) drops it)
        return (lambda ids: streamer.put(torch.tensor(ids)) if ids else None), streamer.end
    return streamer, lambda: None


def generate(model, input_ids, config: DecodeConfig | None = None, *, tokenizer=None, streamer=None,
             timings: bool = False, **options) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` (batch size 1).

    Args:
        model: a loaded transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
            Qwen3ForCausalLM, or the LayerStack `prepare(model)` made of one. Its weights are used in place;
            its config is never changed.
        input_ids: list[int] or LongTensor of shape [1, T] (or [T]).
        config: a DecodeConfig; or give its fields as keyword options (not both):
            strategy: "autoregressive" (the baseline), "early_exit" (lossy: layers [0, E) + the model's
                final norm and head; LayerSkip §4.1) or "self_speculative" (lossless: draft with [0, E),
                verify with [E, L) in one pass, one shared KV cache; LayerSkip §4.2). Dashes also accepted.
            exit_layer: E, 1 <= E < L. Default: the value stored with the model, else L // 2.
            num_speculations: d, drafts per round. Default: the value stored with the model, else 4.
            confidence_threshold: self-speculative only: stop a round's drafting where the draft
                distribution's top probability is below it (adaptive draft length; lossless, also when
                sampling). Default: the value stored with the model, else 0 (always draft d).
            draft_vocab: self-speculative only: the token ids a draft may be (the full head still verifies;
                lossless). None: the model's stored list (draft_vocab.json, from `layerskip train`), else the
                full vocabulary; 0: the full vocabulary; N: the N most frequent stored ids; or a list of ids.
            max_new_tokens: the most new tokens (exact: never exceeded).
            do_sample, temperature, top_k, top_p, seed: sampling; greedy when do_sample is False.
            eos_token_id: stop ids; default the model's generation_config.eos_token_id.
            stop_strings: stop when the new text contains one; `text` is cut before it. Needs `tokenizer`.
        tokenizer: to decode `text` (and for stop strings).
        streamer: callable(list[int]) called with the tokens each step/round emits, or a
            transformers streamer (TextStreamer, ...).
        timings: also split the time into phases (stats.prefill_s / draft_s / verify_s); on a GPU this
            synchronises the device once per phase.
    Returns:
        GenerationResult(token_ids, text, stats). Greedy self-speculative output is token-identical
        to greedy autoregressive output (in fp32).
    """
    if config is None:
        config = DecodeConfig(**options)
    elif options:
        raise LayerSkipError(f"give either a DecodeConfig or keyword options, not both ({', '.join(options)})")
    stack = prepare(model)
    resolved = config.resolve(stack.model)
    if resolved.stop_strings and tokenizer is None:
        raise LayerSkipError("stop_strings need a tokenizer")
    prompt = _prompt_tensor(input_ids, stack.device)
    return decode(stack, prompt, resolved, tokenizer=tokenizer, streamer=streamer, timings=timings)


def decode(stack: LayerStack, prompt: torch.Tensor, cfg: ResolvedConfig, *, tokenizer=None, streamer=None,
           timings: bool = False) -> GenerationResult:
    """`generate` after validation: prompt (1, T) on the stack's device, settings resolved for its model."""
    T = prompt.shape[1]
    if int(prompt.max()) >= stack.vocab_size or int(prompt.min()) < 0:
        raise LayerSkipError(f"input_ids hold token ids outside this model's vocabulary [0, {stack.vocab_size})")
    if stack.max_positions and T + cfg.max_new_tokens > stack.max_positions:
        raise LayerSkipError(
            f"prompt ({T} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
            f"{stack.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )
    stopper = StopChecker(cfg.max_new_tokens, cfg.eos_token_id, cfg.stop_strings, tokenizer)
    stats = GenerationStats(strategy=cfg.strategy, exit_layer=cfg.exit_layer, num_speculations=cfg.num_speculations,
                            confidence_threshold=cfg.confidence_threshold,
                            draft_vocab_size=None if cfg.draft_vocab is None else len(cfg.draft_vocab),
                            matmul_kernels=stack.kernels, num_prompt_tokens=T)
    generator = None
    if cfg.sampling.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=stack.device).manual_seed(cfg.seed)
    on_tokens, finish = _streaming_callback(streamer, prompt)
    t0 = time.perf_counter()

    def emitted(ids: list[int]) -> None:  # the tokens are on the host already: reading the clock costs no sync
        if stats.first_token_s is None:
            stats.first_token_s = time.perf_counter() - t0
        if on_tokens:
            on_tokens(ids)

    speculative = cfg.strategy == "self_speculative"
    timer = Timer(stack.device, stats, ("draft_s", "verify_s") if speculative else ("prefill_s",)) if timings else None
    with torch.inference_mode(), attention_backends(stack.device):
        if cfg.max_new_tokens == 0:
            tokens = []
        elif speculative:
            tokens = decode_self_speculative(stack, prompt, exit_layer=cfg.exit_layer,
                                             num_speculations=cfg.num_speculations, params=cfg.sampling,
                                             stopper=stopper, stats=stats, generator=generator, on_tokens=emitted,
                                             draft_vocab=cfg.draft_vocab_tensor(stack.device),
                                             confidence_threshold=cfg.confidence_threshold, timer=timer)
        else:
            tokens = decode_autoregressive(stack, prompt, num_layers=cfg.exit_layer or stack.num_layers,
                                           params=cfg.sampling, stopper=stopper, stats=stats, generator=generator,
                                           on_tokens=emitted, timer=timer)
    stats.total_s = time.perf_counter() - t0
    finish()
    stats.num_new_tokens = len(tokens)
    text = None
    if tokenizer is not None:
        text = stopper.trim(tokenizer.decode(tokens, skip_special_tokens=True))
    return GenerationResult(token_ids=tokens, text=text, stats=stats)
