"""Where a batched decode's time goes: the built-in model's passes and heads, timed per call, per strategy.

Wraps the engine's `run` (layers [start, end) of a pass) and `logits` (a head) with timers and decodes HumanEval
(or held-out code) prompts in batches of B, 128 new tokens, stored settings, autoregressive then self-speculative.
A diagnostic (the wrappers' own cost is in every figure), not a speed benchmark: benchmarks/batch_stop_ab.py and
serve_load.py give those. A pass of one new token per row ("step") is told apart from longer ones (prompts,
verify passes).

    python benchmarks/batch_profile.py [--prompts humaneval|heldout] [--skip 0] [--limit 16] [--batch-size 4]
        [--threads 1] [--json F]
"""
from __future__ import annotations

import argparse
import collections
import time

import layerskip
from layerskip.files import write_json

from batch_stop_ab import add_batch_args, batch_setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(p)
    args = p.parse_args()
    engine, prompts = batch_setup(args)
    B = args.batch_size
    seconds, calls, rows = collections.defaultdict(float), collections.Counter(), collections.Counter()
    run, logits = engine.run, engine.logits

    def add(key: str, t0: float, n: int) -> None:
        seconds[key] += time.perf_counter() - t0
        calls[key] += 1
        rows[key] += n

    def timed_run(h, start, end, cache, pos, taps=None, whole_cache=False, lengths=None):
        t0 = time.perf_counter()
        out = run(h, start, end, cache, pos, taps, whole_cache, lengths)
        n = h.shape[0] if lengths is not None else h.shape[0] * h.shape[1]
        step = lengths is None and h.shape[1] == 1
        add(f"layers [{start}, {end}) {'step' if step else 'longer'}", t0, n)
        return out

    def timed_logits(h, vocab=None):
        t0 = time.perf_counter()
        out = logits(h, vocab)
        add("head", t0, h.shape[0])
        return out

    layerskip.generate(engine, prompts[:B], max_new_tokens=16, strategy="self_speculative")  # warm-up
    report = {"setup": f"built-in model, {args.prompts} prompts {args.skip}-{args.skip + len(prompts) - 1}, batch {B}, "
                       f"128 new tokens, stored settings, {args.threads} thread(s), fp32"}
    for strategy in ("autoregressive", "self_speculative"):
        seconds.clear(), calls.clear(), rows.clear()
        engine.run, engine.logits = timed_run, timed_logits
        try:
            t0, tokens = time.perf_counter(), 0
            for i in range(0, len(prompts), B):
                out = layerskip.generate(engine, prompts[i:i + B], max_new_tokens=128, strategy=strategy)
                tokens += sum(len(r.token_ids) for r in out)
            total = time.perf_counter() - t0
        finally:
            engine.run, engine.logits = run, logits
        parts = {k: {"seconds": seconds[k], "calls": calls[k], "ms_per_call": 1e3 * seconds[k] / calls[k],
                     "rows_per_call": rows[k] / calls[k]} for k in sorted(seconds)}
        report[strategy] = {"tokens_per_second": tokens / total, "seconds": total, "parts": parts,
                            "other_seconds": total - sum(seconds.values())}
        print(f"{strategy}: {tokens / total:.1f} tok/s, {total:.2f} s")
        for k, v in parts.items():
            print(f"  {k:24s} {v['seconds']:6.2f} s  {v['calls']:5d} calls  {v['ms_per_call']:7.2f} ms a call  "
                  f"{v['rows_per_call']:6.1f} rows a call")
        print(f"  {'other':24s} {report[strategy]['other_seconds']:6.2f} s")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
