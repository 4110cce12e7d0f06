"""What choosing costs `exit_layer="auto"`: the time its bookkeeping takes as a share of the decode.

Decodes each prompt with `exit_layer="auto"` (greedy, the model's stored threshold) and times, inside that decode,
every call of the plan's choosing (`AutoPlan.choose`, and within it `best_round`, the cost model's prediction of a
layer's best round), of its updates (`observe_round`, `observe_speed`) and of the probes' shadow heads
(`auto.shadow_outcomes`); `choose` includes its `best_round` calls. The wrapping adds about a microsecond a call. Reported: microseconds per round and per
call, and each part's share of the decode's wall time. A profile, not a speed comparison: the shares, not the
absolute times, carry from one machine to another.

    python benchmarks/auto_overhead.py [--model M] [--prompts humaneval|heldout] [--limit 16] [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
import functools
import time

import layerskip
from layerskip.decoding import auto, self_speculative
from layerskip.files import write_json
from layerskip.runtime import machine_name

from auto_speed import add_prompt_args, prepared

PARTS = {"choose": (auto.AutoPlan, "choose"), "best_round": (auto.AutoPlan, "best_round"),
         "observe_round": (auto.AutoPlan, "observe_round"), "observe_speed": (auto.AutoPlan, "observe_speed")}


def instrument(spent: dict, calls: collections.Counter) -> None:
    """Wrap the plan's methods and the shadow heads to add their wall time to `spent` (seconds, by part)."""
    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    for name, (owner, attr) in PARTS.items():
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    shadow = timed("shadow_outcomes", auto.shadow_outcomes)
    auto.shadow_outcomes = shadow  # self_speculative and batch call it as auto.shadow_outcomes
    assert self_speculative.auto is auto


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p, prompts="humaneval")
    args = p.parse_args()
    model, tokenizer, engine, task, prompts = prepared(args)
    n = args.max_new_tokens
    cfg = dict(strategy="self_speculative", exit_layer="auto", max_new_tokens=n)
    layerskip.generate(engine, prompts[0], tokenizer=tokenizer, **{**cfg, "max_new_tokens": 16})  # costs, kernels
    spent, calls = collections.defaultdict(float), collections.Counter()
    instrument(spent, calls)
    decode_s, rounds, tokens = 0.0, 0, 0
    for ids, sample in zip(prompts, task.samples):
        r = layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=tuple(sample.stop_strings), **cfg)
        decode_s += r.stats.total_s
        rounds += len(r.stats.exit_layer_per_round)
        tokens += r.stats.num_new_tokens
    parts = {name: {"seconds": spent[name], "calls": calls[name],
                    "us_per_call": 1e6 * spent[name] / max(calls[name], 1),
                    "us_per_round": 1e6 * spent[name] / max(rounds, 1),
                    "share_of_decode": spent[name] / decode_s} for name in (*PARTS, "shadow_outcomes")}
    report = {"model": args.model or "built-in", "prompts": f"{args.prompts}: {len(prompts)} prompts",
              "machine": f"{machine_name()}, {args.threads} threads, fp32",
              "max_new_tokens": n, "decode_seconds": decode_s, "rounds": rounds, "tokens": tokens,
              "parts": parts}
    for name, v in parts.items():
        print(f"{name:16s} {v['us_per_call']:7.1f} us/call  {v['calls'] / max(rounds, 1):4.2f} calls/round  "
              f"{v['us_per_round']:7.1f} us/round  {100 * v['share_of_decode']:5.2f}% of decode")
    print(f"{rounds} rounds, {tokens} tokens, {decode_s:.2f} s decoding ({1e6 * decode_s / rounds:.0f} us/round)")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
