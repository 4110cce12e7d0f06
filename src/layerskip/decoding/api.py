"""`layerskip.generate`: one entry point for autoregressive, early-exit and self-speculative decoding."""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerskip.decoding import draft_vocab as draft_vocabulary
from layerskip.decoding.autoregressive import decode_autoregressive
from layerskip.decoding.result import GenerationResult, GenerationStats
from layerskip.decoding.sampling import SamplingParams
from layerskip.decoding.self_speculative import decode_self_speculative
from layerskip.decoding.stopping import StopChecker
from layerskip.errors import LayerSkipError
from layerskip.forward import LayerStack

STRATEGIES = ("autoregressive", "early_exit", "self_speculative")
DEFAULT_NUM_SPECULATIONS = 4
_stacks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def layer_stack(model) -> LayerStack:
    """The (cached) LayerStack of a model, its matmul kernels tuned for this machine (`LayerStack.tune`)."""
    stack = _stacks.get(model)
    if stack is None or stack.device != model.model.embed_tokens.weight.device or stack.dtype != model.dtype:
        stack = _stacks[model] = LayerStack(model)
        stack.tune()
    return stack


def attention_backends(device: torch.device):
    """On CUDA, keep scaled_dot_product_attention off cuDNN's backend while decoding: with a key length
    that changes every step it pays milliseconds of host-side planning per call (measured on an H100,
    bf16), far more than the attention itself. Flash / memory-efficient / math kernels do not."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def normalize_strategy(strategy: str) -> str:
    name = strategy.replace("-", "_").lower()
    if name not in STRATEGIES:
        raise LayerSkipError(f"unknown strategy {strategy!r}; choose from {', '.join(s.replace('_', '-') for s in STRATEGIES)}")
    return name


def model_defaults(model) -> dict:
    """The decoding settings stored with a LayerSkip-trained model, if any.

    They live in config.json under "layerskip": {"exit_layer": E, "num_speculations": d,
    "confidence_threshold": c, "draft_vocab": [token ids]} (each optional).
    """
    stored = getattr(model.config, "layerskip", None)
    return dict(stored) if isinstance(stored, dict) else {}


def resolve_exit_layer(model, exit_layer: int | None) -> int:
    L = model.config.num_hidden_layers
    if exit_layer is None:
        exit_layer = model_defaults(model).get("exit_layer") or max(1, L // 2)
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < L:
        raise LayerSkipError(f"exit_layer must be an integer in [1, {L - 1}] for this {L}-layer model, got {exit_layer}")
    return exit_layer


def resolve_num_speculations(model, num_speculations: int | None) -> int:
    if num_speculations is None:
        num_speculations = model_defaults(model).get("num_speculations") or DEFAULT_NUM_SPECULATIONS
    if not isinstance(num_speculations, int) or num_speculations < 1:
        raise LayerSkipError(f"num_speculations must be an integer >= 1, got {num_speculations}")
    return num_speculations


def resolve_confidence_threshold(model, confidence_threshold: float | None) -> float:
    if confidence_threshold is None:
        confidence_threshold = model_defaults(model).get("confidence_threshold") or 0.0
    _check_threshold(confidence_threshold)
    return float(confidence_threshold)


def _check_threshold(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LayerSkipError(f"confidence_threshold must be a number in [0, 1), got {value!r}")


def resolve_draft_vocab(model, draft_vocab, device) -> torch.Tensor | None:
    """The draft vocabulary ids (None: the full vocabulary); see draft_vocab.py."""
    stored = model_defaults(model).get("draft_vocab")
    return draft_vocabulary.resolve(stored if isinstance(stored, list) else None, draft_vocab,
                                    model.get_output_embeddings().weight.shape[0], device)


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def _prompt_tensor(input_ids, device) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise LayerSkipError(f"input_ids must have shape [1, T] (batch size 1), got {list(input_ids.shape)}")
    else:
        try:
            ids = torch.tensor([list(input_ids)], dtype=torch.long)
        except (TypeError, ValueError):
            raise LayerSkipError("input_ids must be a list of ints or a LongTensor of shape [1, T]") from None
    if ids.shape[1] == 0:
        raise LayerSkipError("the prompt is empty: give at least one token")
    return ids.to(device=device, dtype=torch.long)


def check_options(*, strategy="autoregressive", max_new_tokens=128, do_sample=False, temperature=1.0, top_k=None,
                  top_p=None, num_speculations=None, confidence_threshold=None) -> SamplingParams:
    """Validate the model-independent options (the CLI calls this before loading a model)."""
    normalize_strategy(strategy)
    if confidence_threshold is not None:
        _check_threshold(confidence_threshold)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise LayerSkipError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    if num_speculations is not None and (not isinstance(num_speculations, int) or num_speculations < 1):
        raise LayerSkipError(f"num_speculations must be an integer >= 1, got {num_speculations}")
    return _check_sampling(do_sample, temperature, top_k, top_p)


def _check_sampling(do_sample, temperature, top_k, top_p) -> SamplingParams:
    if do_sample:
        if temperature is None or temperature <= 0:
            raise LayerSkipError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 0:
            raise LayerSkipError(f"top_k must be >= 0, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise LayerSkipError(f"top_p must be in (0, 1], got {top_p}")
    return SamplingParams(bool(do_sample), float(temperature or 1.0), top_k or None, top_p)


def _streaming_callback(streamer, prompt: torch.Tensor):
    """Accept a callable(list[int]) or a transformers streamer (put/end); returns (on_tokens, finish)."""
    if streamer is None:
        return None, lambda: None
    if hasattr(streamer, "put"):
        streamer.put(prompt.cpu())  # transformers' protocol: the prompt first (TextStreamer(skip_prompt=True) drops it)
        return (lambda ids: streamer.put(torch.tensor(ids)) if ids else None), streamer.end
    return streamer, lambda: None


def generate(model, input_ids, *, strategy: str = "autoregressive", exit_layer: int | None = None,
             num_speculations: int | None = None, confidence_threshold: float | None = None, draft_vocab=None,
             max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, stop_strings: list[str] | str | None = None,
             tokenizer=None, seed: int | None = None, streamer=None) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `input_ids` (batch size 1).

    Args:
        model: a loaded transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
            Qwen3ForCausalLM. Its weights are used in place; its config is never changed.
        input_ids: list[int] or LongTensor of shape [1, T] (or [T]).
        strategy: "autoregressive" (the baseline), "early_exit" (lossy: layers [0, E) + the model's
            final norm and head; LayerSkip §4.1) or "self_speculative" (lossless: draft with [0, E),
            verify with [E, L) in one pass, one shared KV cache; LayerSkip §4.2). Dashes also accepted.
        exit_layer: E, 1 <= E < L. Default: the value stored with the model, else L // 2.
        num_speculations: d, drafts per round. Default: the value stored with the model, else 4.
        confidence_threshold: self-speculative only: stop a round's drafting where the draft
            distribution's top probability is below it (adaptive draft length; lossless, also when
            sampling). Default: the value stored with the model, else 0 (always draft d).
        draft_vocab: self-speculative only: the token ids a draft may be (the full head still verifies;
            lossless). None: the list stored with the model by `layerskip train`, else the full
            vocabulary; 0: the full vocabulary; N: the N most frequent stored ids; or a list of ids.
        max_new_tokens: the most new tokens (exact: never exceeded).
        do_sample, temperature, top_k, top_p, seed: sampling; greedy when do_sample is False.
        eos_token_id: stop ids; default the model's generation_config.eos_token_id.
        stop_strings: stop when the new text contains one; `text` is cut before it. Needs `tokenizer`.
        tokenizer: to decode `text` (and for stop strings).
        streamer: callable(list[int]) called with the tokens each step/round emits, or a
            transformers streamer (TextStreamer, ...).
    Returns:
        GenerationResult(token_ids, text, stats). Greedy self-speculative output is token-identical
        to greedy autoregressive output (in fp32).
    """
    params = check_options(strategy=strategy, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p, num_speculations=num_speculations,
                           confidence_threshold=confidence_threshold)
    strategy = normalize_strategy(strategy)
    stack = layer_stack(model)
    L = stack.num_layers
    if strategy != "autoregressive":
        exit_layer = resolve_exit_layer(model, exit_layer)
    else:
        exit_layer = None
    speculative = strategy == "self_speculative"
    num_speculations = resolve_num_speculations(model, num_speculations) if speculative else None
    confidence_threshold = resolve_confidence_threshold(model, confidence_threshold) if speculative else None
    vocab = resolve_draft_vocab(model, draft_vocab, stack.device) if speculative else None
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise LayerSkipError("stop_strings need a tokenizer")
    prompt = _prompt_tensor(input_ids, stack.device)
    T = prompt.shape[1]
    if stack.max_positions and T + max_new_tokens > stack.max_positions:
        raise LayerSkipError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{stack.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )
    stopper = StopChecker(max_new_tokens, _eos_ids(model, eos_token_id), stop_strings, tokenizer)
    stats = GenerationStats(strategy=strategy, exit_layer=exit_layer, num_speculations=num_speculations,
                            confidence_threshold=confidence_threshold,
                            draft_vocab_size=None if vocab is None else vocab.shape[0], num_prompt_tokens=T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=stack.device).manual_seed(seed)
    on_tokens, finish = _streaming_callback(streamer, prompt)
    with torch.inference_mode(), attention_backends(stack.device):
        if max_new_tokens == 0:
            tokens = []
        elif strategy == "self_speculative":
            tokens = decode_self_speculative(stack, prompt, exit_layer=exit_layer, num_speculations=num_speculations,
                                             params=params, stopper=stopper, stats=stats, generator=generator,
                                             on_tokens=on_tokens, draft_vocab=vocab,
                                             confidence_threshold=confidence_threshold)
        else:
            tokens = decode_autoregressive(stack, prompt, num_layers=exit_layer or L, params=params, stopper=stopper,
                                           stats=stats, generator=generator, on_tokens=on_tokens)
    finish()
    stats.num_new_tokens = len(tokens)
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if stop_strings:
            text = stopper.trim(text)
    return GenerationResult(token_ids=tokens, text=text, stats=stats)
