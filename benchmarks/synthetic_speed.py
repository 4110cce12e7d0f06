"""Decoding speed on a synthetic Llama whose draft is exact: ours vs transformers, side by side in one run.

The model (the issues' reference): 16 layers, width 768, 12 heads, MLP 2048, vocab 32000, random
weights, with layers >= E made identity on the residual stream (o_proj and down_proj zeroed), so every
draft at exit E is accepted. 64-token prompt, 128 new tokens, greedy, fp32 (or --dtype).

Measured, interleaved per repetition so that machine noise hits every contender alike:
  ours autoregressive, ours self-speculative (E, d), transformers greedy generate(),
  transformers generate(assistant_early_exit=E) with num_assistant_tokens=d (set on generation_config,
  schedule "constant", confidence threshold 0: generate() ignores them as arguments).
Also: the cost model's predicted speedup (layerskip.evaluation.cost_model: isolated timings of a draft
step t_E, a verify pass t_v(k) and a full step t_ar), and peak memory of each strategy in a fresh process.

    python benchmarks/synthetic_speed.py [--threads 2] [--repeats 5] [--device cpu] [--dtype float32]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

import layerskip
from layerskip.evaluation.cost_model import measure_step_times, predicted_speedup
from layerskip.runtime import cpu_name
from layerskip.testing import make_exact_from, make_random_model


def build_model(exit_layer: int, device: str, dtype: torch.dtype):
    model = make_random_model("llama", num_layers=16, hidden_size=768, intermediate_size=2048, num_heads=12,
                              vocab_size=32000, max_position_embeddings=2048, seed=0)
    make_exact_from(model, exit_layer)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def contenders(model, ids, n, exit_layer, d):
    prompt = torch.tensor([ids], device=model.device)
    engine = layerskip.prepare(model, tune=True)  # ours: one engine, CPU matmul kernels timed once

    def hf_greedy():
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()

    def hf_early_exit():
        gc = model.generation_config
        saved = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = d, "constant", 0.0
        try:
            with torch.inference_mode():
                out = model.generate(prompt, max_new_tokens=n, do_sample=False, assistant_early_exit=exit_layer)
        finally:
            gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = saved
        return out[0, len(ids):].tolist()

    def ours_ar():
        return layerskip.generate(engine, ids, max_new_tokens=n).token_ids

    def ours_ss():
        return layerskip.generate(engine, ids, strategy="self_speculative", exit_layer=exit_layer,
                                  num_speculations=d, max_new_tokens=n).token_ids

    return engine, {"ours_autoregressive": ours_ar, "ours_self_speculative": ours_ss,
                    "transformers_greedy": hf_greedy, "transformers_assistant_early_exit": hf_early_exit}


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory(strategy: str, args) -> dict:
    """Run one strategy in a fresh process; report its peak RSS (CPU) or peak CUDA allocation."""
    cmd = [sys.executable, __file__, "--memory-probe", strategy, "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads), "--exit-layer", str(args.exit_layer), "--num-speculations",
           str(args.num_speculations), "--max-new-tokens", str(args.max_new_tokens),
           "--prompt-len", str(args.prompt_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args) -> None:
    """Peak resident memory while decoding: the model is built first (its construction needs more memory
    than decoding does), then the kernel's high-water mark is reset (Linux: "5" > /proc/self/clear_refs)."""
    model = build_model(args.exit_layer, args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    spec = args.memory_probe == "self_speculative"
    layerskip.generate(layerskip.prepare(model, tune=True), ids, strategy=args.memory_probe,
                       exit_layer=args.exit_layer if spec else None, num_speculations=args.num_speculations if spec
                       else None, max_new_tokens=args.max_new_tokens)
    peak = _proc_status_kib("VmHWM")
    result = {"strategy": args.memory_probe, "peak_rss_mib": peak / 1024, "rss_before_mib": before / 1024,
              "decode_growth_mib": (peak - before) / 1024}
    if model.device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--exit-layer", type=int, default=4)
    p.add_argument("--num-speculations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)

    E, d, n = args.exit_layer, args.num_speculations, args.max_new_tokens
    model = build_model(E, args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    engine, fns = contenders(model, ids, n, E, d)
    if args.skip_transformers:
        fns = {k: v for k, v in fns.items() if k.startswith("ours")}
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs to compare
    reference = outputs["ours_autoregressive"]
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = _now(model.device)
            fn()
            times[name].append(_now(model.device) - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    stats = layerskip.generate(engine, ids, strategy="self_speculative", exit_layer=E, num_speculations=d,
                               max_new_tokens=n).stats
    steps = measure_step_times(engine, E, [d], context_len=args.prompt_len, repeats=20)
    iso = {"t_E": steps.t_draft, "t_v": steps.t_verify[d], "t_ar": steps.t_ar}
    n_bar = stats.tokens_per_round
    predicted = predicted_speedup(steps, n_bar, d)
    measured = med["ours_autoregressive"] / med["ours_self_speculative"]
    report = {
        "machine": f"{platform.node()} {cpu_name()}, torch {torch.__version__}, "
                   f"{args.threads} threads, {args.device}, {args.dtype}",
        "matmul_kernels": list(engine.kernels),
        "setup": f"16x768 Llama, vocab 32000, exact draft at E={E}, d={d}, prompt {args.prompt_len}, {n} new tokens",
        "seconds_median": med,
        "tokens_per_second": {k_: n / v for k_, v in med.items()},
        "identical_to_ours_autoregressive": {k_: v == reference for k_, v in outputs.items()},
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_round": n_bar,
        "isolated_ms": {k_: 1000 * v for k_, v in iso.items()},
        "cost_model_predicted_speedup": predicted,
        "measured_speedup_vs_ours_autoregressive": measured,
        "measured_over_predicted": measured / predicted,
    }
    if "transformers_greedy" in med:
        report["ours_autoregressive_vs_transformers_greedy"] = med["transformers_greedy"] / med["ours_autoregressive"]
        report["ours_self_speculative_vs_transformers_greedy"] = med["transformers_greedy"] / med["ours_self_speculative"]
        report["ours_self_speculative_vs_transformers_assistant_early_exit"] = (
            med["transformers_assistant_early_exit"] / med["ours_self_speculative"])
        report["transformers_assistant_early_exit_vs_greedy"] = (
            med["transformers_greedy"] / med["transformers_assistant_early_exit"])
    mem = {s: peak_memory(s, args) for s in ("autoregressive", "self_speculative")}
    key = "peak_cuda_mib" if args.device.startswith("cuda") else "peak_rss_mib"
    report["peak_memory_mib"] = {s: m[key] for s, m in mem.items()}
    report["decode_growth_mib"] = {s: m.get("decode_growth_mib") for s, m in mem.items()}
    report["peak_memory_self_speculative_over_autoregressive"] = mem["self_speculative"][key] / mem["autoregressive"][key]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
