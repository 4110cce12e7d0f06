"""Self-speculative against autoregressive on HumanEval, under several matmul-kernel choices, paired in one process.

On a shared, noisy machine two separate `layerskip bench` runs can differ by more than the change being measured.
Here every prompt is decoded autoregressively and under each variant in turn (the order rotated from prompt to
prompt), for several repetitions, so that a slow spell falls on all of them alike. A variant is a kernel per bucket
of row counts (`layerskip.kernels.TUNE_ROWS`; "tuned" = what `layerskip.kernels.tune` chose). Every output is checked to
be token-identical to the autoregressive one. Prints the running speedups after each repetition.

    python benchmarks/paired_kernels.py [--model M] [--threads 1] [--reps 3] \\
        [--variant wxt,wxt,wxt,wxt] [--variant wxt,wxt,onednn,onednn] [--variant tuned]
"""
from __future__ import annotations

import argparse
import time

import torch

import layerskip
from layerskip.decoding.config import eos_ids
from layerskip.evaluation.bench import encode_prompt
from layerskip.evaluation.tasks import load_task
from layerskip.kernels import KERNELS, TUNE_ROWS
from layerskip.models import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--variant", action="append", help="kernels per row bucket, comma-separated, or 'tuned'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    stack = layerskip.prepare(model, tune=True)
    tuned = stack.kernels
    variants = {"autoregressive": tuned}
    for v in args.variant or ["tuned", ",".join(["wxt"] * len(TUNE_ROWS))]:
        kernels = tuned if v == "tuned" else tuple(v.split(","))
        if len(kernels) != len(TUNE_ROWS) or any(k not in KERNELS for k in kernels):
            raise SystemExit(f"--variant {v}: {len(TUNE_ROWS)} kernels from {', '.join(KERNELS)}, or 'tuned'")
        variants[v] = kernels
    print(f"tuned kernels per bucket {TUNE_ROWS}: {tuned}")
    task = load_task("humaneval", limit=args.limit)
    eos = eos_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, s, model, args.max_new_tokens) for s in task.samples]

    def run(i: int, name: str):
        stack.kernels = variants[name]
        strategy = "autoregressive" if name == "autoregressive" else "self_speculative"
        t0 = time.perf_counter()
        out = layerskip.generate(stack, prompts[i], strategy=strategy, max_new_tokens=args.max_new_tokens,
                                 eos_token_id=eos or None, stop_strings=tuple(task.samples[i].stop_strings),
                                 tokenizer=tokenizer)
        return out.token_ids, time.perf_counter() - t0

    names = list(variants)
    for name in names:  # warm-up
        run(0, name)
    seconds = dict.fromkeys(names, 0.0)
    for rep in range(args.reps):
        for i in range(len(prompts)):
            shift = (rep * len(prompts) + i) % len(names)
            done = {name: run(i, name) for name in names[shift:] + names[:shift]}
            for name, (ids, dt) in done.items():
                if ids != done["autoregressive"][0]:
                    raise SystemExit(f"prompt {i}: {name} differs from autoregressive decoding")
                seconds[name] += dt
        print(f"after repetition {rep + 1}: " + ", ".join(
            f"{name} {seconds['autoregressive'] / seconds[name]:.3f}x" for name in names[1:]), flush=True)


if __name__ == "__main__":
    main()
