"""Replay: self-speculative rounds predicted from one autoregressive decode, for every (E, d, threshold).

Terminology as in decoding/self_speculative.py: exit layer E, d = num_speculations, k <= d the drafts of
a round, a the accepted ones; the confidence threshold C stops a round's drafting where the draft
distribution's top probability is below C.

Why it is exact. Greedy self-speculative decoding emits the full model's greedy tokens y_1..y_n. A round
starting after y_i drafts d_1 = exit-E argmax given y_1..y_i, d_2 given y_1..y_i, d_1, and so on. While every
draft so far was right, that prefix *is* the greedy output, so the draft, its confidence and its acceptance
are those of one teacher-forced pass of exit E over y (`trace_exits`). The first wrong draft ends the accepted
run; what comes after it is rejected whatever it is. So the rounds and the accepted counts of `replay_rounds`
equal a real decode's (tests/evaluation/test_replay.py checks them against `layerskip.generate`). Only the
number of drafts made after the first wrong one, when C > 0, is an estimate: the real drafts there see the
wrong token.

Cost: each round costs k t_E + t_v(k) (cost_model.py: isolated draft step and verify pass times), the
autoregressive decode n t_ar, so the predicted speedup is n t_ar / sum over rounds. With a verify pass that
cost no more than t_v(0) whatever k (`flat_verify`), it is the bound a perfectly batched verifier would give.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerskip.decoding.api import prepare
from layerskip.decoding.sampling import greedy_accept
from layerskip.decoding.self_speculative import confident
from layerskip.evaluation.cost_model import StepTimes


@dataclass
class ExitTrace:
    """One decoded sequence and what each exit would have drafted along it.

    tokens: (n,) the full model's greedy tokens. draft[E], confidence[E]: (n,) exit E's argmax (a token id
    of the full vocabulary) and top probability at each of those n positions, given the true prefix.
    """

    tokens: torch.Tensor
    draft: dict[int, torch.Tensor]
    confidence: dict[int, torch.Tensor]


def trace_exits(model, prompt: list[int], output: list[int], exit_layers, draft_vocab: torch.Tensor | None = None) -> ExitTrace:
    """Teacher-forced over prompt + output: every exit's draft and confidence at the output's positions.

    draft_vocab: the draft head's token ids (as in decoding), or None for the full head.
    """
    stack = prepare(model)
    ids = torch.tensor([prompt + output], device=stack.device)  # (1, T + n)
    T, n = len(prompt), len(output)
    wanted = set(exit_layers)
    draft, confidence = {}, {}
    with torch.inference_mode():
        cache = stack.new_cache(ids.shape[1])
        h = stack.embed(ids)  # (1, T + n, H)
        for layer in range(max(wanted)):
            h = stack.run(h, layer, layer + 1, cache, 0)
            if layer + 1 in wanted:
                logits = stack.logits(h[0, T - 1:T - 1 + n], draft_vocab).float()  # (n, V')
                top, arg = logits.softmax(-1).max(-1)  # (n,), (n,)
                draft[layer + 1] = (arg if draft_vocab is None else draft_vocab[arg]).cpu()
                confidence[layer + 1] = top.cpu()
    return ExitTrace(torch.tensor(output), draft, confidence)


def replay_rounds(trace: ExitTrace, exit_layer: int, num_speculations: int, confidence_threshold: float = 0.0,
                  max_new_tokens: int | None = None) -> list[tuple[int, int]]:
    """(k drafts, a accepted) for each round greedy self-speculative decoding makes over `trace`.

    max_new_tokens: the decode's limit (default: the trace's length), which caps k as in decoding: a round
    always leaves room for the verifier's own token.
    """
    tokens = trace.tokens.tolist()
    draft = trace.draft[exit_layer].tolist()
    top = trace.confidence[exit_layer].tolist()
    n = len(tokens)
    limit = n if max_new_tokens is None else max_new_tokens
    target = torch.tensor(tokens + [-1])  # -1: past the output's end nothing is compared
    rounds, i = [], 0  # i: tokens emitted before this round
    while i < n:
        k_max = min(num_speculations, limit - i - 1)
        k = 0
        while k < k_max and i + k < n and confident(top[i + k], confidence_threshold):
            k += 1  # past the output's end the decode stopped; below the threshold drafting ends the round
        a, _ = greedy_accept(torch.tensor(draft[i:i + k]), target[i:i + k + 1])  # the decoder's own acceptance
        rounds.append((k, a))
        i += a + 1
    return rounds


def predicted_speedup(rounds_per_trace: list[list[tuple[int, int]]], lengths: list[int], times: StepTimes,
                      *, flat_verify: bool = False) -> float:
    """sum n t_ar / sum over rounds (k t_E + t_v(k)); `flat_verify`: t_v(k) = t_v(0) for every k."""
    ar = sum(lengths) * times.t_ar
    spec = sum(k * times.t_draft + times.verify_time(0 if flat_verify else k)
               for rounds in rounds_per_trace for k, _ in rounds)
    return ar / spec


FIELDS = ["exit_layer", "num_speculations", "confidence_threshold", "predicted_speedup", "flat_verify_speedup",
          "acceptance_rate", "tokens_per_round", "drafts_per_round"]


def decode_and_trace(stack, tokenizer, task, exit_layers, vocab: torch.Tensor | None, max_new_tokens: int,
                     progress: bool = True) -> tuple[list[ExitTrace], int]:
    """Each prompt decoded autoregressively as `layerskip bench` decodes it (the task's stop strings, the model's
    EOS) and its output traced through every exit (`trace_exits`). Returns the traces of the non-empty outputs and
    a typical cache length while decoding them (the mean of prompt + half the output)."""
    from tqdm import tqdm

    import layerskip
    from layerskip.decoding.config import eos_ids
    from layerskip.evaluation.bench import encode_prompt

    model = stack.model
    eos = eos_ids(model, tokenizer)
    traces, contexts = [], []
    for sample in tqdm(task.samples, desc="replay: decode + trace", disable=not progress, leave=False):
        prompt = encode_prompt(tokenizer, sample, model, max_new_tokens)
        out = layerskip.generate(stack, prompt, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                                 stop_strings=tuple(sample.stop_strings), tokenizer=tokenizer).token_ids
        if out:
            traces.append(trace_exits(model, prompt, out, exit_layers, vocab))
            contexts.append(len(prompt) + len(out) // 2)
    return traces, (sum(contexts) // len(contexts) if contexts else 0)


def replay_grid(model, tokenizer, task, exit_layers, num_speculations, thresholds, *, max_new_tokens: int = 64,
                draft_vocab: int | None = None, progress: bool = True) -> list[dict]:
    """Predicted greedy self-speculative speedup for every (E, d, C), from one autoregressive decode per prompt.

    The prompts are decoded as `layerskip bench` decodes them (the task's stop strings, the model's EOS);
    each output is traced through every exit once (`trace_exits`), the rounds replayed, and the cost of a
    round taken from isolated step times measured on this machine (`measure_step_times`), once per E.
    Returns one row per (E, d, C) with FIELDS; `flat_verify_speedup` is the bound with t_v(k) = t_v(0).
    """
    from tqdm import tqdm

    from layerskip.decoding.config import DecodeConfig
    from layerskip.evaluation.cost_model import measure_step_times

    stack = prepare(model)
    model = stack.model
    vocab = DecodeConfig("self_speculative", draft_vocab=draft_vocab).resolve(model, warn=False).draft_vocab_tensor(
        stack.device)
    traces, context = decode_and_trace(stack, tokenizer, task, exit_layers, vocab, max_new_tokens, progress)
    if not traces:
        return []
    lengths = [len(t.tokens) for t in traces]
    rows = []
    for E in tqdm(list(exit_layers), desc="replay: step times", disable=not progress, leave=False):
        times = measure_step_times(stack, E, range(0, max(num_speculations) + 1), context_len=context,
                                   draft_vocab=vocab)
        for d in num_speculations:
            for c in thresholds:
                rounds = [replay_rounds(t, E, d, c, max_new_tokens) for t in traces]
                flat = [r for rs in rounds for r in rs]
                drafted, accepted = sum(k for k, _ in flat), sum(a for _, a in flat)
                rows.append({"exit_layer": E, "num_speculations": d, "confidence_threshold": c,
                             "predicted_speedup": predicted_speedup(rounds, lengths, times),
                             "flat_verify_speedup": predicted_speedup(rounds, lengths, times, flat_verify=True),
                             "acceptance_rate": accepted / drafted if drafted else None,
                             "tokens_per_round": sum(lengths) / len(flat), "drafts_per_round": drafted / len(flat)})
    return rows
