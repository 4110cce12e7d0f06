"""The batch's drafting stops (decoding/batch.py), paired in one process: the batch's floor and a row's own cut.

Two knobs of a batched self-speculative round with a confidence threshold C:
  factor  the batch's drafting ends where its next drafts' expected accepted tokens fall below factor x E / L x B
          (`_worth_a_pass`; shipped: PASS_COST; 0 turns the rule off);
  cut     a row's own drafting ends on a draft whose top probability is below cut x C (shipped: ROW_THRESHOLD;
          1.0 is C itself, batch 1's rule).
Every (factor, cut) pair given is a variant. The built-in model, prompts in batches of B, 128 new tokens, stored
settings, 1 thread. For each group of B prompts, batched autoregressive decoding and every variant run one after
another (the order rotated per group and repetition), so a slow spell of the machine costs every variant alike;
each variant's tokens/s over autoregressive's is taken over all groups of a repetition. Every output must equal
autoregressive's.

    python benchmarks/batch_stop_ab.py [--batch-size 4] [--prompts humaneval|heldout] [--skip 0] [--limit 16]
        [--factors 1.4] [--cuts 1.0,0.35] [--repeats 4] [--json F]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import layerskip
from layerskip import models
from layerskip.decoding import batch as batch_module
from layerskip.evaluation.tasks import load_task
from layerskip.files import write_json


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """The flags the batch benchmarks share: the batch, the prompt set and its slice, the threads, the JSON."""
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompts", choices=("humaneval", "heldout"), default="humaneval")
    p.add_argument("--skip", type=int, default=0, help="prompts left out at the start of the set")
    p.add_argument("--limit", type=int, default=16, help="prompts after them")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)


def batch_setup(args) -> tuple:
    """(engine, encoded prompts) for `add_batch_args`' flags: the built-in model, torch's threads set."""
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load(None)
    engine = layerskip.prepare(model, tune=True)
    if args.prompts == "heldout":
        from auto_speed import heldout_task  # benchmarks/: the held-out code prompts
        samples = heldout_task(args.skip, args.limit).samples
    else:
        samples = load_task("humaneval", limit=args.skip + args.limit).samples[args.skip:]
    return engine, [tokenizer(s.prompt)["input_ids"] for s in samples]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(p)
    p.add_argument("--factors", type=floats, default=[batch_module.PASS_COST])
    p.add_argument("--cuts", type=floats, default=[batch_module.ROW_THRESHOLD])
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    engine, prompts = batch_setup(args)
    B = args.batch_size
    groups = [prompts[i:i + B] for i in range(0, len(prompts), B)]
    variants = ["autoregressive"] + list(itertools.product(args.factors, args.cuts))
    name = lambda v: v if isinstance(v, str) else f"factor {v[0]} cut {v[1]}"

    def run(variant, group) -> tuple[float, list]:
        if variant == "autoregressive":
            t0, out = time.perf_counter(), layerskip.generate(engine, group, max_new_tokens=128,
                                                              strategy="autoregressive")
        else:
            factor, batch_module.ROW_THRESHOLD = variant
            batch_module._worth_a_pass = lambda chances, rows, share: sum(chances) >= factor * share * rows
            t0, out = time.perf_counter(), layerskip.generate(engine, group, max_new_tokens=128,
                                                              strategy="self_speculative")
        return time.perf_counter() - t0, [r.token_ids for r in out]

    shipped = batch_module._worth_a_pass, batch_module.ROW_THRESHOLD
    ratios = {name(v): [] for v in variants[1:]}
    try:
        run(variants[-1], groups[0])  # warm-up
        for rep in range(args.repeats):
            seconds = dict.fromkeys(variants, 0.0)
            for g, group in enumerate(groups):
                turn = (rep + g) % len(variants)
                outputs = {}
                for v in variants[turn:] + variants[:turn]:
                    s, outputs[v] = run(v, group)
                    seconds[v] += s
                for v in variants[1:]:
                    if outputs[v] != outputs["autoregressive"]:
                        raise SystemExit(f"{name(v)}: output differs from autoregressive decoding")
            for v in variants[1:]:
                ratios[name(v)].append(seconds["autoregressive"] / seconds[v])
            print(" | ".join(f"{k}: {r[-1]:.3f}x" for k, r in ratios.items()), flush=True)
    finally:
        batch_module._worth_a_pass, batch_module.ROW_THRESHOLD = shipped
    lo, hi = args.skip, args.skip + len(prompts) - 1
    report = {"setup": f"built-in model, {args.prompts} prompts {lo}-{hi}, batch {B}, 128 new tokens, stored settings, "
                       f"{args.threads} thread(s), fp32; autoregressive and every variant per group of prompts",
              "shipped": {"factor": batch_module.PASS_COST, "cut": batch_module.ROW_THRESHOLD},
              "ratios_over_autoregressive": ratios,
              "median": {k: statistics.median(r) for k, r in ratios.items()}}
    print(report["median"])
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
