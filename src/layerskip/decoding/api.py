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
from layerskip.decoding.batch import Row, decode_batch
from layerskip.decoding.config import STRATEGIES, DecodeConfig, ResolvedConfig
from layerskip.decoding.result import GenerationResult, GenerationStats, Timer
from layerskip.decoding.self_speculative import decode_self_speculative
from layerskip.decoding.static import capacity_for, decode_static, static_decoder
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


def _batch_prompts(input_ids, attention_mask) -> list[list[int]] | None:
    """The prompts of a batch as token-id lists, or None for a single prompt (list[int], [T] or [1, T])."""
    if isinstance(input_ids, torch.Tensor):
        if attention_mask is None and (input_ids.dim() < 2 or input_ids.shape[0] == 1):
            return None
        if input_ids.dim() != 2:
            raise LayerSkipError(f"a batch of input_ids must have shape [B, T], got {list(input_ids.shape)}")
        if attention_mask is None:
            return input_ids.tolist()
        mask = torch.as_tensor(attention_mask)
        if mask.shape != input_ids.shape:
            raise LayerSkipError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(input_ids.shape)}")
        mask = mask.to(torch.long).cpu()
        prompts = []
        for b, (ids, m) in enumerate(zip(input_ids.tolist(), mask)):
            n = int(m.sum())
            if not bool(((m == 0) | (m == 1)).all()) or (n and not bool(m[len(m) - n:].all())):
                raise LayerSkipError(f"attention_mask row {b} is not left padding (zeros, then ones)")
            prompts.append(ids[len(ids) - n:])
        return prompts
    if attention_mask is not None:
        raise LayerSkipError("attention_mask goes with a [B, T] tensor of input_ids; a list of prompts needs none")
    items = list(input_ids) if isinstance(input_ids, (list, tuple)) else None
    if items and all(isinstance(x, (list, tuple, torch.Tensor)) for x in items):
        return [x.tolist() if isinstance(x, torch.Tensor) else list(x) for x in items]
    return None


def generate(model, input_ids, config: DecodeConfig | None = None, *, attention_mask=None, tokenizer=None,
             streamer=None, timings: bool = False, **options):
    """Generate up to `max_new_tokens` tokens after `input_ids`: one prompt, or a batch of them.

    Args:
        model: a loaded transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
            Qwen3ForCausalLM, or the LayerStack `prepare(model)` made of one. Its weights are used in place;
            its config is never changed.
        input_ids: one prompt: list[int], or a LongTensor of shape [1, T] (or [T]). A batch: a list of token-id
            lists (any lengths), or a [B, T] LongTensor, left-padded with `attention_mask` (transformers'
            convention). A batch is decoded in one batch (decoding/batch.py) and returns a list.
        attention_mask: with a [B, T] tensor: 1 for real tokens, 0 for the left padding.
        config: a DecodeConfig; or give its fields as keyword options (not both):
            strategy: "autoregressive" (the baseline), "early_exit" (lossy: layers [0, E) + the model's
                final norm and head; LayerSkip §4.1) or "self_speculative" (lossless: draft with [0, E),
                verify with [E, L) in one pass, one shared KV cache; LayerSkip §4.2). Dashes also accepted.
            exit_layer: E, 1 <= E < L, or "auto" (self-speculative only: E and d chosen while decoding,
                decoding/auto.py). Default: the value stored with the model, else "auto" for self-speculative
                decoding and L // 2 for early exit.
            num_speculations: d, drafts per round. Default: the value stored with the model, else 4. With
                exit_layer "auto", the longest draft it may choose (None: up to auto.MAX_SPECULATIONS, 12).
            confidence_threshold: self-speculative only: stop a round's drafting where the draft
                distribution's top probability is below it (adaptive draft length; lossless, also when
                sampling). Default: the value stored with the model, else 0 (always draft d).
            draft_vocab: self-speculative only: the token ids a draft may be (the full head still verifies;
                lossless). None: the model's stored list (draft_vocab.json, from `layerskip train`), else the
                full vocabulary; 0: the full vocabulary; N: the N most frequent stored ids; or a list of ids.
            max_new_tokens: the most new tokens (exact: never exceeded).
            compile: the static-shape path (decoding/static.py): every round one fixed-shape function, through
                torch.compile, and on a GPU captured as a CUDA graph; greedy, with a fixed exit layer and no
                confidence threshold. The first call with a shape compiles (stats.compile_s, outside total_s);
                later calls on the same engine (`prepare`) replay it.
            do_sample, temperature, top_k, top_p, seed: sampling; greedy when do_sample is False.
            eos_token_id: stop ids; default the model's generation_config.eos_token_id.
            stop_strings: stop when the new text contains one; `text` is cut before it. Needs `tokenizer`.
        tokenizer: to decode `text` (and for stop strings).
        streamer: callable(list[int]) called with the tokens each step/round emits, or a
            transformers streamer (TextStreamer, ...). For a batch: callable(row index, list[int]).
        timings: also split the time into phases (stats.prefill_s / draft_s / verify_s); on a GPU this
            synchronises the device once per phase. Single prompts only.
    Returns:
        GenerationResult(token_ids, text, stats); for a batch, a list of them in the prompts' order. Greedy
        self-speculative output is token-identical to greedy autoregressive output (in fp32), and a batch row's
        output to that prompt's alone. With a seed, batch row b samples from a generator seeded seed + b.
    """
    if config is None:
        config = DecodeConfig(**options)
    elif options:
        raise LayerSkipError(f"give either a DecodeConfig or keyword options, not both ({', '.join(options)})")
    stack = prepare(model)
    resolved = config.resolve(stack.model)
    if resolved.stop_strings and tokenizer is None:
        raise LayerSkipError("stop_strings need a tokenizer")
    prompts = _batch_prompts(input_ids, attention_mask)
    if prompts is not None:
        if timings:
            raise LayerSkipError("timings=True splits the phases of one prompt's decode; give a single prompt")
        if streamer is not None and hasattr(streamer, "put"):
            raise LayerSkipError("a transformers streamer takes one sequence; for a batch pass a callable(row, ids)")
        return decode_many(stack, prompts, resolved, tokenizer=tokenizer, on_tokens=streamer)
    prompt = _prompt_tensor(input_ids, stack.device)
    return decode(stack, prompt, resolved, tokenizer=tokenizer, streamer=streamer, timings=timings)


def check_prompt(stack: LayerStack, ids: list[int], cfg: ResolvedConfig, what: str) -> None:
    if not ids:
        raise LayerSkipError(f"{what} is empty: give at least one token")
    if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
        raise LayerSkipError(f"{what} must be a list of integer token ids")
    if max(ids) >= stack.vocab_size or min(ids) < 0:
        raise LayerSkipError(f"{what} holds token ids outside this model's vocabulary [0, {stack.vocab_size})")
    if stack.max_positions and len(ids) + cfg.max_new_tokens > stack.max_positions:
        raise LayerSkipError(
            f"{what} ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
            f"{stack.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )


def _new_stats(stack: LayerStack, cfg: ResolvedConfig, num_prompt_tokens: int) -> GenerationStats:
    return GenerationStats(strategy=cfg.strategy, exit_layer=cfg.exit_layer, num_speculations=cfg.num_speculations,
                           confidence_threshold=cfg.confidence_threshold,
                           draft_vocab_size=None if cfg.draft_vocab is None else len(cfg.draft_vocab),
                           matmul_kernels=stack.kernels, num_prompt_tokens=num_prompt_tokens)


def final_text(tokenizer, stopper: StopChecker, tokens: list[int]) -> str | None:
    """A result's `text`: the new tokens decoded, cut before the first stop string (None without a tokenizer)."""
    return None if tokenizer is None else stopper.trim(tokenizer.decode(tokens, skip_special_tokens=True))


def _new_generator(stack: LayerStack, cfg: ResolvedConfig, seed_offset: int = 0) -> torch.Generator | None:
    if cfg.sampling.do_sample and cfg.seed is not None:
        return torch.Generator(device=stack.device).manual_seed(cfg.seed + seed_offset)
    return None


def new_row(stack: LayerStack, cfg: ResolvedConfig, index, ids: list[int], tokenizer=None, seed_offset: int = 0) -> Row:
    """A batch row (decoding/batch.py) for prompt `ids` under `cfg`: its stop rules, stats, sampling parameters
    and generator (seeded cfg.seed + seed_offset when sampling with a seed)."""
    return Row(index, list(ids), StopChecker(cfg.max_new_tokens, cfg.eos_token_id, cfg.stop_strings, tokenizer),
               _new_stats(stack, cfg, len(ids)), cfg.sampling, _new_generator(stack, cfg, seed_offset))


def decode_many(stack: LayerStack, prompts: list[list[int]], cfg: ResolvedConfig, *, tokenizer=None,
                on_tokens=None) -> list[GenerationResult]:
    """A batch after validation: every prompt decoded in one batch (decoding/batch.py), results in order."""
    if not prompts:
        raise LayerSkipError("the batch is empty: give at least one prompt")
    for b, ids in enumerate(prompts):
        check_prompt(stack, ids, cfg, f"prompt {b}")
    rows = [new_row(stack, cfg, b, ids, tokenizer, seed_offset=b) for b, ids in enumerate(prompts)]
    decoder = _compiled(stack, cfg, rows)
    t0 = time.perf_counter()

    def emitted(b: int, ids: list[int]) -> None:
        if rows[b].stats.first_token_s is None:
            rows[b].stats.first_token_s = time.perf_counter() - t0
        if on_tokens:
            on_tokens(b, ids)

    if decoder is not None:
        with torch.inference_mode(), attention_backends(stack.device):
            decode_static(decoder, rows, on_tokens=emitted)
    elif cfg.max_new_tokens > 0:
        with torch.inference_mode(), attention_backends(stack.device):
            decode_batch(stack, list(rows), strategy=cfg.strategy, exit_layer=cfg.exit_layer,
                         num_speculations=cfg.num_speculations, draft_vocab=cfg.draft_vocab_tensor(stack.device),
                         confidence_threshold=cfg.confidence_threshold or 0.0, on_tokens=emitted)
    total = time.perf_counter() - t0
    results = []
    for r in rows:
        r.stats.total_s, r.stats.num_new_tokens = total, len(r.generated)  # the batch's time: rows share it
        results.append(GenerationResult(r.generated, final_text(tokenizer, r.stopper, r.generated), r.stats))
    return results


def _compiled(stack: LayerStack, cfg: ResolvedConfig, rows: list[Row]):
    """The static-shape decoder for these rows, compiled (and captured) before the clock starts, its time in each
    row's stats.compile_s; None unless cfg.compile (or when there is nothing to decode)."""
    if not cfg.compile or cfg.max_new_tokens == 0:
        return None
    speculative = cfg.strategy == "self_speculative"
    d = cfg.num_speculations if speculative else None
    with torch.inference_mode(), attention_backends(stack.device):
        decoder = static_decoder(stack, rows=len(rows), capacity=capacity_for([len(r.pending) for r in rows],
                                 cfg.max_new_tokens, d), num_layers=cfg.exit_layer or stack.num_layers,
                                 num_speculations=d, vocab=cfg.draft_vocab_tensor(stack.device) if speculative
                                 else None)
        seconds = decoder.warm_up()
    for r in rows:
        r.stats.compile_s, r.stats.matmul_kernels = seconds, None  # the compiler chose the kernels
    return decoder


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
    if cfg.compile and timings:
        raise LayerSkipError("timings=True splits the eager path's phases; with compile=True a round is one "
                             "graph (stats.compile_s and total_s are reported)")
    stopper = StopChecker(cfg.max_new_tokens, cfg.eos_token_id, cfg.stop_strings, tokenizer)
    stats = _new_stats(stack, cfg, T)
    generator = _new_generator(stack, cfg)
    on_tokens, finish = _streaming_callback(streamer, prompt)
    row = Row(0, prompt[0].tolist(), stopper, stats, cfg.sampling, generator) if cfg.compile else None
    decoder = _compiled(stack, cfg, [row]) if row else None
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
        elif decoder is not None:
            decode_static(decoder, [row], on_tokens=lambda _, ids: emitted(ids))
            tokens = row.generated
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
    return GenerationResult(token_ids=tokens, text=final_text(tokenizer, stopper, tokens), stats=stats)
