"""The batch's draft stop (decoding/batch.py `_worth_a_pass`) at several floors, paired in one process.

The built-in model, HumanEval prompts in batches of B, 128 new tokens, stored settings, 1 thread. Each repetition
runs batched autoregressive decoding, then self-speculative decoding once per floor factor (the floor is factor x
E / L x B expected accepted tokens; the order rotated per repetition), and records each one's tokens/s over
autoregressive's in that repetition. Every output must equal autoregressive's. The shipped factor is PASS_COST.

    python benchmarks/batch_stop_ab.py [--batch-size 4] [--prompts 0:16] [--factors 1.0,1.4] [--repeats 6] [--json F]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import layerskip
from layerskip import models
from layerskip.decoding import batch as batch_module
from layerskip.evaluation.tasks import load_task
from layerskip.files import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompts", default="0:16", help="HumanEval prompts START:END")
    p.add_argument("--factors", default="1.0,1.4")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lo, hi = (int(x) for x in args.prompts.split(":"))
    factors = [float(x) for x in args.factors.split(",")]
    model, tokenizer = models.load(None)
    engine = layerskip.prepare(model, tune=True)
    prompts = [tokenizer(s.prompt)["input_ids"] for s in load_task("humaneval", limit=hi).samples[lo:]]
    B = args.batch_size

    def run(**kw):
        t0, out = time.perf_counter(), []
        for i in range(0, len(prompts), B):
            out += [r.token_ids for r in layerskip.generate(engine, prompts[i:i + B], max_new_tokens=128, **kw)]
        return sum(map(len, out)) / (time.perf_counter() - t0), out

    shipped = batch_module._worth_a_pass
    ratios = {f: [] for f in factors}
    try:
        for rep in range(args.repeats):
            ar, reference = run(strategy="autoregressive")
            for f in factors[rep % len(factors):] + factors[:rep % len(factors)]:
                batch_module._worth_a_pass = lambda chances, rows, share, f=f: sum(chances) >= f * share * rows
                tps, out = run(strategy="self_speculative")
                if out != reference:
                    raise SystemExit(f"factor {f}: output differs from autoregressive decoding")
                ratios[f].append(tps / ar)
            print(" ".join(f"{f}: {ratios[f][-1]:.2f}x" for f in factors), flush=True)
    finally:
        batch_module._worth_a_pass = shipped
    report = {"setup": f"built-in model, HumanEval prompts {lo}-{hi - 1}, batch {B}, 128 new tokens, stored settings, "
                       f"{args.threads} thread(s), fp32", "shipped_factor": batch_module.PASS_COST,
              "ratios_over_autoregressive": {str(f): r for f, r in ratios.items()},
              "median": {str(f): statistics.median(r) for f, r in ratios.items()}}
    print(report["median"])
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
