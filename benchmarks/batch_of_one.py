"""A batch of one prompt (what `layerskip serve` decodes for a lone request) against `generate` on the prompt alone.

Held-out code prompts (as benchmarks/auto_speed.py makes them), autoregressive and self-speculative at the stored
settings, each prompt decoded alone and as a one-row batch (`generate(engine, [ids])`, decoding/batch.py),
interleaved per prompt, the order rotating. Reported: tokens/s of each, and whether every output is identical.

    python benchmarks/batch_of_one.py [--limit 12] [--threads 1] [--json FILE]
"""
from __future__ import annotations

import argparse

import torch

import layerskip
from layerskip.evaluation.bench import encode_prompt
from layerskip.files import write_json
from layerskip.runtime import machine_name

from auto_speed import heldout_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", type=int, default=24, help="held-out prompts left out (the stored settings' tuning set)")
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = layerskip.load(None)
    engine = layerskip.prepare(model, tune=True)
    n = args.max_new_tokens
    prompts = [encode_prompt(tokenizer, s, model, n) for s in heldout_task(args.skip, args.limit).samples]
    runs = {(strategy, batched): [] for strategy in ("autoregressive", "self_speculative") for batched in (0, 1)}
    keys = list(runs)
    for i, ids in enumerate([prompts[0]] + prompts):  # the first: a warm-up, not counted
        for strategy, batched in keys[i % len(keys):] + keys[:i % len(keys)]:
            out = layerskip.generate(engine, [ids] if batched else ids, strategy=strategy, max_new_tokens=n,
                                     eos_token_id=[])
            if i:
                runs[(strategy, batched)].append(out[0] if batched else out)
    report = {"model": "built-in", "prompts": f"held-out prompts {args.skip}..{args.skip + len(prompts) - 1}",
              "machine": f"{machine_name()}, {args.threads} threads, fp32",
              "max_new_tokens": n, "results": {}}
    reference = [r.token_ids for r in runs[("autoregressive", 0)]]
    for (strategy, batched), rs in runs.items():
        name = f"{strategy}_{'batch_of_one' if batched else 'alone'}"
        tps = sum(r.stats.num_new_tokens for r in rs) / sum(r.stats.total_s for r in rs)
        report["results"][name] = {"tokens_per_second": tps,
                                   "identical_to_autoregressive": [r.token_ids for r in rs] == reference}
        print(f"{name:36s} {tps:7.1f} tok/s  identical {report['results'][name]['identical_to_autoregressive']}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
