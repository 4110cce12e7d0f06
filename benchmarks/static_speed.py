"""The static-shape path (decoding/static.py) against the eager path and transformers' own fast path, side by side.

The model (issue 21's reference, `--shape 1b`): Llama-3.2-1B-shaped, 16 layers, width 2048, 32 query / 8 key-value
heads, MLP 8192, vocab 128256, tied head, random weights, with layers >= E made identity on the residual stream
(o_proj and down_proj zeroed) so every draft at E is exact. bf16, batch 1, a 64-token prompt, 256 new tokens,
greedy. `--shape tiny` is a small model for a dry run on a CPU.

Contenders, prepared first (compile / capture time recorded apart), then timed interleaved per repetition:
  transformers_greedy                 generate(), dynamic cache
  transformers_static_compile         generate(cache_implementation="static"): on CUDA transformers compiles the
                                      forward itself (its documented fast path; CPU: static cache, not compiled)
  transformers_assistant_early_exit   generate(assistant_early_exit=E), d drafts per round (constant schedule)
  ours_autoregressive[_graphs|_compiled], ours_self_speculative_d{d}[_vocab][_graphs|_compiled]
      eager: the layer loop; graphs: the static path's round captured as a CUDA graph without torch.compile;
      compiled: torch.compile and a CUDA graph (`generate(compile=True)`). _vocab: a draft vocabulary taken from the
      model's own greedy output on other prompts.
Also: the GPU's copy bandwidth and the weight bytes per token (the memory-bandwidth bound), each contender's output
against ours autoregressive (identical, and the matching prefix in tokens), and with --fp32-check the same model in
fp32 on the eager and captured paths (token-identical expected).

Results are written after every repetition (a run cut short keeps what it measured); `--budget-s` stops preparing
and timing in time.

    python benchmarks/static_speed.py --shape 1b --device cuda --dtype bfloat16 --json docs/results/gpu/static_1b.json
    python benchmarks/static_speed.py --shape tiny --device cpu --dtype float32 --repeats 1   # dry run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch

import layerskip
from layerskip.decoding import static
from layerskip.decoding.api import attention_backends, new_row
from layerskip.decoding.config import DecodeConfig
from layerskip.runtime import cpu_name
from layerskip.testing import make_exact_from, make_random_model

RESERVE_S = 120  # budget kept for the timed repetitions: no contender is prepared with less left

SHAPES = {  # name: (layers, width, query heads, kv heads, MLP, vocab, tied)
    "1b": (16, 2048, 32, 8, 8192, 128256, True),
    "tiny": (8, 256, 8, 2, 768, 4096, True),
}


def build_model(shape: str, exit_layer: int, device: str, dtype: torch.dtype):
    layers, width, heads, kv, mlp, vocab, tied = SHAPES[shape]
    with torch.device(device):
        model = make_random_model("llama", num_layers=layers, hidden_size=width, intermediate_size=mlp,
                                  num_heads=heads, num_kv_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                                  max_position_embeddings=4096, seed=0)
    make_exact_from(model, exit_layer)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype=dtype).eval()


def now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth(device) -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted), median of 10; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        t0 = now(device)
        dst.copy_(src)
        times.append(now(device) - t0)
    return 2 * src.numel() / statistics.median(times[1:])


def ours_static(engine, ids, n, *, exit_layer=None, d=None, vocab=None, compile=True):
    """Our static path with compile on or off (graphs on CUDA either way): the prepared decoder's call."""
    strategy = "self_speculative" if d else "autoregressive"
    kw = dict(exit_layer=exit_layer, num_speculations=d) if d else {}
    cfg = DecodeConfig(strategy, max_new_tokens=n, eos_token_id=(), confidence_threshold=0.0 if d else None,
                       draft_vocab=vocab or (0 if d else None), **kw).resolve(engine.model, warn=False)
    decoder = static.static_decoder(engine, rows=1, capacity=static.capacity_for([len(ids)], n, d),
                                    num_layers=exit_layer if d else engine.num_layers, num_speculations=d,
                                    vocab=cfg.draft_vocab_tensor(engine.device), compile=compile)

    def run():
        row = new_row(engine, cfg, 0, ids)
        with torch.inference_mode(), attention_backends(engine.device):
            decoder.warm_up()
            static.decode_static(decoder, [row])
        return row.generated
    return run


def contenders(model, engine, ids, n, E, speculations, vocab, skip_transformers, modes):
    prompt = torch.tensor([ids], device=model.device)
    fns = {}
    if not skip_transformers:
        def hf(**kw):
            def run():
                with torch.inference_mode():
                    return model.generate(prompt, max_new_tokens=n, do_sample=False, **kw)[0, len(ids):].tolist()
            return run

        def hf_early_exit(d):
            def run():
                gc = model.generation_config
                saved = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
                gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = d, "constant"
                gc.assistant_confidence_threshold = 0.0
                try:
                    return hf(assistant_early_exit=E)()
                finally:
                    (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule,
                     gc.assistant_confidence_threshold) = saved
            return run
        fns["transformers_greedy"] = hf()
        fns["transformers_assistant_early_exit"] = hf_early_exit(max(speculations))
    eager = lambda **kw: (lambda: layerskip.generate(engine, ids, max_new_tokens=n, eos_token_id=[], **kw).token_ids)
    # in the order they are prepared (the budget may cut the last): full heads, the longest draft first
    cells = [(None, None)] + [(d, None) for d in sorted(speculations, reverse=True)] + (
        [(d, vocab) for d in sorted(speculations, reverse=True)] if vocab else [])
    for mode in modes:
        if mode == "compiled" and not skip_transformers:  # the baseline of the targets: before ours compile
            fns["transformers_static_compile"] = hf(cache_implementation="static")
        for d, v in cells:
            name = "ours_autoregressive" if d is None else f"ours_self_speculative_d{d}" + ("_vocab" if v else "")
            if mode == "eager":
                kw = {} if d is None else dict(strategy="self_speculative", exit_layer=E, num_speculations=d,
                                               confidence_threshold=0.0, draft_vocab=v or 0)
                fns[name] = eager(**kw)
            else:
                fns[f"{name}_{mode}"] = ours_static(engine, ids, n, exit_layer=E, d=d, vocab=v,
                                                    compile=mode == "compiled")
    return fns


def draft_vocab_from_outputs(engine, n, size, prompt_len, vocab_size, seed=2):
    """The `size` most frequent tokens of the model's own greedy output on 8 other prompts (batched, eager)."""
    g = torch.Generator().manual_seed(seed)
    others = [torch.randint(0, vocab_size, (prompt_len,), generator=g).tolist() for _ in range(8)]
    counts = Counter(t for r in layerskip.generate(engine, others, max_new_tokens=n, eos_token_id=[])
                     for t in r.token_ids)
    return sorted(t for t, _ in counts.most_common(size))


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fp32_check(args) -> dict:
    """fp32, the same model: eager autoregressive vs the static path without compile (captured as CUDA graphs on a
    GPU; `_static`), every d."""
    model = build_model(args.shape, args.exit_layer, args.device, torch.float32)
    engine = layerskip.prepare(model)
    ids = prompt_ids(args)
    n, E = args.max_new_tokens, args.exit_layer
    reference = layerskip.generate(engine, ids, max_new_tokens=n, eos_token_id=[]).token_ids
    out = {"ours_autoregressive_static": ours_static(engine, ids, n, compile=False)() == reference}
    for d in args.speculations:
        out[f"ours_self_speculative_d{d}"] = layerskip.generate(
            engine, ids, max_new_tokens=n, eos_token_id=[], strategy="self_speculative", exit_layer=E,
            num_speculations=d, confidence_threshold=0.0, draft_vocab=0).token_ids == reference
        out[f"ours_self_speculative_d{d}_static"] = ours_static(engine, ids, n, exit_layer=E, d=d,
                                                               compile=False)() == reference
    del model, engine
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return {"identical_to_eager_autoregressive": out}


def prompt_ids(args) -> list[int]:
    vocab = SHAPES[args.shape][5]
    return torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()


def write_json(path: str | None, report: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def summarize(med: dict, n: int, bound: float | None) -> dict:
    tps = {k: n / v for k, v in med.items()}
    out = {}

    def ratio(a, b):
        if a in tps and b in tps:
            out[f"{a}_over_{b}"] = tps[a] / tps[b]
    for base in ("transformers_static_compile", "transformers_greedy", "transformers_assistant_early_exit",
                 "ours_autoregressive", "ours_autoregressive_compiled"):
        for name in tps:
            if name.startswith("ours") and name != base:
                ratio(name, base)
    if bound:
        for name in tps:
            if name.startswith("ours_autoregressive") or name.startswith("transformers_static"):
                out[f"{name}_over_bandwidth_bound"] = tps[name] / bound
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--exit-layer", type=int, default=4)
    p.add_argument("--speculations", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8])
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="0: no draft-vocabulary contenders")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="eager,graphs,compiled", help="of ours: eager, graphs, compiled")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--fp32-check", action="store_true", help="also check fp32 token identity (eager vs captured)")
    p.add_argument("--budget-s", type=float, default=None, help="stop preparing / timing after this many seconds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    left = lambda: float("inf") if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
    modes = [m for m in args.modes.split(",") if m]
    if torch.device(args.device).type != "cuda" and "graphs" in modes:
        modes.remove("graphs")  # graphs without a GPU are the eager path
    report = {
        "machine": f"{platform.node()} {cpu_name()}, torch {torch.__version__}, {args.device}"
                   + (f" ({torch.cuda.get_device_name()})" if torch.device(args.device).type == "cuda" else "")
                   + f", {args.dtype}, {torch.get_num_threads()} threads",
        "setup": f"{args.shape}-shaped Llama {SHAPES[args.shape]}, exact drafts at E={args.exit_layer}, batch 1, "
                 f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens, greedy",
        "command": " ".join(sys.argv),
    }
    model = build_model(args.shape, args.exit_layer, args.device, getattr(torch, args.dtype))
    engine = layerskip.prepare(model, tune=True)
    ids, n = prompt_ids(args), args.max_new_tokens
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    bandwidth = copy_bandwidth(args.device)
    bound = bandwidth / weight_bytes if bandwidth else None
    report.update(weight_bytes=weight_bytes, copy_bandwidth_gb_s=bandwidth and bandwidth / 1e9,
                  bandwidth_bound_tokens_per_second=bound)
    vocab = None
    if args.draft_vocab_size:
        vocab = draft_vocab_from_outputs(engine, n, args.draft_vocab_size, args.prompt_len, SHAPES[args.shape][5])
        report["draft_vocab_size"] = len(vocab)
    fns = contenders(model, engine, ids, n, args.exit_layer, args.speculations, vocab, args.skip_transformers, modes)
    prepared, prepare_s, outputs = {}, {}, {}
    for name, fn in fns.items():  # cheap ones first: contenders() lists eager, then graphs, then compiled
        if left() < RESERVE_S:
            print(f"skipping {name}: budget", flush=True)
            continue
        t0 = now(args.device)
        outputs[name] = fn()  # compiles / captures on the first call
        prepare_s[name] = now(args.device) - t0
        prepared[name] = fn
        print(f"prepared {name} in {prepare_s[name]:.1f} s", flush=True)
        report["first_call_s"] = prepare_s
        write_json(args.json, report)  # a run cut short while compiling keeps what it prepared
    reference = outputs.get("ours_autoregressive_compiled") or outputs["ours_autoregressive"]
    report["first_call_s"] = prepare_s
    report["identical_to_ours_autoregressive"] = {k: v == reference for k, v in outputs.items()}
    report["matching_prefix_tokens"] = {k: matching_prefix(v, reference) for k, v in outputs.items()}
    times = {name: [] for name in prepared}
    for rep in range(args.repeats):
        if rep and left() < 20:
            break
        for name, fn in prepared.items():
            t0 = now(args.device)
            fn()
            times[name].append(now(args.device) - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        report.update(repeats=rep + 1, seconds_median=med, tokens_per_second={k: n / v for k, v in med.items()},
                      ratios=summarize(med, n, bound))
        write_json(args.json, report)
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {n / v:.0f}" for k, v in med.items()), flush=True)
    stats = {}
    for name, kw in [(f"d{d}" + ("_vocab" if v else ""), dict(num_speculations=d, draft_vocab=v or 0))
                     for d in args.speculations for v in ([None, vocab] if vocab else [None])]:
        s = layerskip.generate(engine, ids, max_new_tokens=n, eos_token_id=[], strategy="self_speculative",
                               exit_layer=args.exit_layer, confidence_threshold=0.0, **kw).stats
        stats[name] = {"acceptance_rate": s.acceptance_rate, "tokens_per_round": s.tokens_per_round}
    report["self_speculative_acceptance"] = stats
    write_json(args.json, report)
    if args.fp32_check and left() > 60:  # last: the bf16 targets come first
        del model, engine, prepared, fns
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        report["fp32"] = fp32_check(args)
        print("fp32:", report["fp32"], flush=True)
        write_json(args.json, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
