"""What choosing costs `exit_layer="auto"`: the time its bookkeeping takes as a share of the decode.

Decodes each prompt with `exit_layer="auto"` (greedy, the model's stored threshold) and times, inside that decode,
every call of the plan's choosing (`AutoPlan.choose`, and within it `best_round`, the cost model's prediction of a
layer's best round), of its updates (`observe_round`, `observe_speed`) and of the probes' shadow heads
(`auto.shadow_outcomes`); `choose` includes its `best_round` calls. The wrapping adds about a microsecond a call.
Also every batch-1 round's wall time but the prefill's: a probe round's extra cost (its taps, shadow heads and
flags) is its time over the mean plain round that drafted as many tokens. Reported: microseconds per round and per
call, and each part's share of the decode's wall time. A profile, not a speed comparison: the shares, not the
absolute times, carry from one machine to another.

    python benchmarks/auto_overhead.py [--model M] [--prompts humaneval|heldout|thirdparty] [--limit 16] [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
import functools
import statistics
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


def time_rounds(rounds: list) -> None:
    """Wrap batch 1's run_round to append (seconds, probed, drafted) of every round but a generation's first (the
    prompt's prefill) to `rounds`."""
    shipped = self_speculative.run_round

    @functools.wraps(shipped)
    def wrapper(stack, cache, pending, *a, probes=(), **kw):
        t0 = time.perf_counter()
        r, pos = shipped(stack, cache, pending, *a, probes=probes, **kw)
        if pending.shape[1] == 1:
            rounds.append((time.perf_counter() - t0, bool(probes), r.drafted))
        return r, pos
    self_speculative.run_round = wrapper


def probe_extra(rounds: list) -> dict:
    """What a probe round costs over a plain round that drafted as many tokens (us; the mean over probe rounds whose
    draft count plain rounds also had; per round: over all the timed rounds, the prefills left out)."""
    plain = collections.defaultdict(list)
    for s, probed, k in rounds:
        if not probed:
            plain[k].append(s)
    extra = [s - statistics.mean(plain[k]) for s, probed, k in rounds if probed and plain[k]]
    return {"probe_rounds": sum(p for _, p, _ in rounds), "matched": len(extra),
            "us_per_probe_round": 1e6 * statistics.mean(extra) if extra else None,
            "us_per_round": 1e6 * sum(extra) / len(rounds) if extra else None}


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
    timed_rounds: list = []
    time_rounds(timed_rounds)
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
              "parts": parts, "probe_round_extra": probe_extra(timed_rounds)}
    for name, v in parts.items():
        print(f"{name:16s} {v['us_per_call']:7.1f} us/call  {v['calls'] / max(rounds, 1):4.2f} calls/round  "
              f"{v['us_per_round']:7.1f} us/round  {100 * v['share_of_decode']:5.2f}% of decode")
    extra = report["probe_round_extra"]
    if extra["us_per_round"] is not None:
        print(f"probe rounds: {extra['us_per_probe_round']:.0f} us over a plain round of as many drafts "
              f"({extra['matched']} of {extra['probe_rounds']} matched), {extra['us_per_round']:.1f} us/round")
    print(f"{rounds} rounds, {tokens} tokens, {decode_s:.2f} s decoding ({1e6 * decode_s / rounds:.0f} us/round)")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
