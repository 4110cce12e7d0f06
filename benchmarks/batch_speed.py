"""Batched decoding throughput on the synthetic exact-draft Llama: ours vs transformers, B rows at a time.

The model of benchmarks/synthetic_speed.py (16 layers, width 768, vocab 32000, layers >= E identity, so every
draft at exit E is accepted). For each batch size B: B prompts of ragged lengths (48 to 64 tokens), 128 new
tokens each, greedy, fp32. Contenders, interleaved per repetition:
  ours batched autoregressive, ours batched self-speculative at each d in --num-speculations,
  transformers' batched greedy generate() on the same prompts left-padded (attention_mask).
Reported: total tokens/s, the ratios, whether every row equals ours autoregressive (and ours batch 1), and the
batched cost model's predicted speedup (cost_model.measure_batch_step_times) beside the measured one.

    python benchmarks/batch_speed.py [--threads 2] [--batch-sizes 1,4,8,16] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import layerskip
from layerskip.evaluation.cost_model import measure_batch_step_times
from layerskip.files import write_json
from layerskip.runtime import machine_name
from layerskip.testing import make_exact_from, make_random_model


def build_model(exit_layer: int) -> torch.nn.Module:
    model = make_random_model("llama", num_layers=16, hidden_size=768, intermediate_size=2048, num_heads=12,
                              vocab_size=32000, max_position_embeddings=2048, seed=0)
    make_exact_from(model, exit_layer)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def transformers_batched(model, prompts, n):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--exit-layer", type=int, default=4)
    p.add_argument("--num-speculations", default="2,4,8")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    E, n = args.exit_layer, args.max_new_tokens
    ds = [int(x) for x in args.num_speculations.split(",")]
    model = build_model(E)
    engine = layerskip.prepare(model, tune=True)
    gen = torch.Generator().manual_seed(1)
    report = {"machine": f"{machine_name()}, "
                         f"torch {torch.__version__}, {args.threads} threads, fp32",
              "setup": f"16x768 Llama, vocab 32000, exact draft at E={E}, prompts 48-64 tokens, {n} new tokens",
              "matmul_kernels": list(engine.kernels), "by_batch_size": {}}
    for B in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [torch.randint(1, 32000, (int(torch.randint(48, 65, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(B)]
        fns = {"ours_autoregressive": lambda: [r.token_ids for r in layerskip.generate(engine, prompts, max_new_tokens=n)]}
        for d in ds:
            fns[f"ours_self_speculative_d{d}"] = lambda d=d: [r.token_ids for r in layerskip.generate(
                engine, prompts, strategy="self_speculative", exit_layer=E, num_speculations=d, max_new_tokens=n,
                draft_vocab=0, confidence_threshold=0)]
        fns["transformers_greedy"] = lambda: transformers_batched(model, prompts, n)
        outputs = {k: f() for k, f in fns.items()}  # warm-up, and the outputs compared
        single = [layerskip.generate(engine, q, max_new_tokens=n).token_ids for q in prompts]
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: B * n / v for k, v in med.items()}
        ar = tps["ours_autoregressive"]
        row = {"tokens_per_second": tps,
               "over_ours_autoregressive": {k: v / ar for k, v in tps.items()},
               "ours_autoregressive_over_transformers": ar / tps["transformers_greedy"],
               "identical_to_ours_autoregressive": {k: v == outputs["ours_autoregressive"] for k, v in outputs.items()},
               "ours_autoregressive_rows_equal_batch_1": outputs["ours_autoregressive"] == single,
               "predicted_speedup": {}}
        for d in ds:
            t = measure_batch_step_times(engine, E, d, B, context_len=64 + n // 2, repeats=5)
            row["predicted_speedup"][f"d{d}"] = t.predicted_speedup(d + 1, d)  # exact drafts: d + 1 tokens a round
            row.setdefault("step_ms", {})[f"d{d}"] = {"t_draft": 1e3 * t.t_draft, "t_verify": 1e3 * t.t_verify,
                                                      "t_ar": 1e3 * t.t_ar}
        report["by_batch_size"][str(B)] = row
        print(f"B={B}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items()), flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
