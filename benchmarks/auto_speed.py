"""exit_layer="auto" against the best static (E, d, C) cell and the model's stored settings, side by side in one run.

For one model and one prompt set: (1) a full replay sweep (`layerskip sweep --replay`'s replay_grid: exact
acceptance of every (E, d, C) cell from one autoregressive decode per prompt, costed with step times measured
here) ranks every cell; (2) autoregressive, the stored settings, the `--top` best replayed cells and `auto` are
timed on the same prompts, interleaved per prompt (the order rotating), after a warm-up of each. Reported:
tokens/s, speedup over autoregressive, auto over the best timed static cell and over the stored settings, and
whether every output equals autoregressive decoding. (3) With --confirm (the default) the ratios come from a
second timed pass of autoregressive, stored, the best cell and auto: the pass that picked the best cell flatters
it (the fastest of several noisy timings), a fresh one does not. Prompt sets: `heldout` (functions from held-out
standard library modules, the shape the built-in model's settings were tuned on; the first --skip prompts, the
tuning set, are left out), `thirdparty` (functions from the held-out third-party packages,
corpus.THIRD_PARTY_HELDOUT: code no training and no settings choice saw) or `humaneval`. `--synthetic`: the 16x768
Llama whose layers >= 4 are the identity (the exact-draft model of synthetic_speed.py), where the best cell is known
to be E = 4 with a long draft.

    python benchmarks/auto_speed.py [--model M] --prompts heldout|thirdparty|humaneval [--limit 16] [--json FILE]
    python benchmarks/auto_speed.py --synthetic [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace

import torch

import layerskip
from layerskip.decoding.auto import candidate_layers, summary
from layerskip.decoding.config import model_defaults
from layerskip.evaluation.bench import encode_prompt
from layerskip.evaluation.tasks import load_task
from layerskip.files import write_json
from layerskip.runtime import machine_name


def heldout_task(skip: int, limit: int, shape: str = "def"):
    """Completion prompts from held-out stdlib modules, without the first `skip`: round-robin over the files, each
    file's first 4 functions first (prompts 0..91, as scripts/build_default_model.py makes them; the stored settings
    were tuned on 0..23), then its later ones (92 on: no tuning has seen them)."""
    from layerskip.corpus import stdlib_files

    return code_task(stdlib_files("heldout"), skip, limit, shape)


def thirdparty_task(skip: int, limit: int, shape: str = "def"):
    """Completion prompts from the held-out third-party packages (corpus.THIRD_PARTY_HELDOUT: code no training
    and no settings choice saw), in the order of `code_task` over their files taken a package at a time in turn
    (the first file of each package, then the second, ...), so that any first part of the list covers every
    package. 3523 `def` prompts with this venv's packages."""
    from layerskip.corpus import round_robin, third_party_files

    return code_task(round_robin(third_party_files("heldout")), skip, limit, shape)


def code_task(files, skip: int, limit: int, shape: str = "def"):
    """A jsonl task of completion prompts from code files, without the first `skip`: round-robin over the files,
    each file's first 4 functions first, then its later ones."""
    from layerskip.corpus import read_texts
    from layerskip.training.selfgen import context_prompts

    per_file = [[p for p, _ in context_prompts(t, shape=shape)] for t in read_texts(files)]
    order = [(i >= 4, i, f) for f, rows in enumerate(per_file) for i in range(len(rows))]
    rows = [per_file[f][i] for _, i, f in sorted(order)][skip:skip + limit]
    if not rows:
        raise SystemExit(f"no prompts past --skip {skip}: the set has {len(order)}")
    path = os.path.join(tempfile.mkdtemp(), "prompts.jsonl")
    with open(path, "w") as f:
        for p in rows:
            f.write(json.dumps({"prompt": p}) + "\n")
    return load_task(f"jsonl:{path}")


def add_prompt_args(p: argparse.ArgumentParser, *, prompts: str = "heldout", limit: int = 16) -> None:
    """The flags these benchmarks share: the model, the prompt set and its size, the tokens per prompt, the torch
    threads and the JSON report."""
    p.add_argument("--model", default=None, help="a --model spec (default: the built-in model)")
    p.add_argument("--prompts", choices=("heldout", "thirdparty", "humaneval"), default=prompts,
                   help="held-out stdlib code, held-out third-party packages' code, or HumanEval")
    p.add_argument("--skip", type=int, default=None,
                   help="prompts left out at the start of the set (default: 24 held-out ones, which with 0..23 "
                        "tuned the built-in model's stored settings; no HumanEval ones)")
    p.add_argument("--limit", type=int, default=limit)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)


def prompt_skip(args) -> int:
    """The prompts `add_prompt_args`' --skip leaves out: as given, else 24 held-out ones, no HumanEval ones."""
    return args.skip if args.skip is not None else 24 if args.prompts == "heldout" else 0


def report_header(args, prompts: list) -> dict:
    """The fields a paired benchmark's JSON report opens with: the model, the prompts (set, count, range), the
    machine and the tokens per prompt."""
    skip = prompt_skip(args)
    return {"model": args.model or "built-in",
            "prompts": f"{args.prompts}: {len(prompts)} prompts ({skip}..{skip + len(prompts) - 1})",
            "machine": f"{machine_name()}, {args.threads} threads, fp32", "max_new_tokens": args.max_new_tokens}


def prompt_task(args):
    """The task `add_prompt_args`' flags name: held-out stdlib or third-party code prompts, or HumanEval ones, past
    the first --skip."""
    skip = prompt_skip(args)
    if args.prompts == "heldout":
        return heldout_task(skip, args.limit)
    if args.prompts == "thirdparty":
        return thirdparty_task(skip, args.limit)
    task = load_task("humaneval", limit=skip + args.limit)
    return replace(task, samples=task.samples[skip:])


def prepared(args):
    """(model, tokenizer, engine, task, encoded prompts) for `add_prompt_args`' flags, torch's threads set."""
    torch.set_num_threads(args.threads)
    model, tokenizer = layerskip.load(args.model)
    engine = layerskip.prepare(model, tune=True)
    task = prompt_task(args)
    return model, tokenizer, engine, task, [encode_prompt(tokenizer, s, model, args.max_new_tokens)
                                            for s in task.samples]


def timed(engine, prompts, configs: dict, tokenizer, stops) -> dict:
    for cfg in configs.values():  # warm-up: kernels, auto's cost table
        layerskip.generate(engine, prompts[0], tokenizer=tokenizer, **{**cfg, "max_new_tokens": 16})
    runs = {name: [] for name in configs}
    names = list(configs)
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=stops[i],
                                                 **configs[name]))
    out = {}
    for name, rs in runs.items():
        tokens, seconds = sum(r.stats.num_new_tokens for r in rs), sum(r.stats.total_s for r in rs)
        drafted = sum(r.stats.drafted for r in rs)
        out[name] = {"config": {k: v for k, v in configs[name].items() if k != "max_new_tokens"},
                     "tokens_per_second": tokens / seconds, "tokens": tokens,
                     "acceptance_rate": sum(r.stats.accepted for r in rs) / drafted if drafted else None,
                     "identical_to_autoregressive":
                         [r.token_ids for r in rs] == [r.token_ids for r in runs["autoregressive"]]}
        if configs[name].get("exit_layer") == "auto":
            out[name]["choices"] = summary(sum((r.stats.exit_layer_per_round for r in rs), []),
                                           sum((r.stats.speculations_per_round for r in rs), []))
    base = out["autoregressive"]["tokens_per_second"]
    for r in out.values():
        r["speedup"] = r["tokens_per_second"] / base
    return out


def real_model(args) -> dict:
    model, tokenizer, engine, task, prompts = prepared(args)
    from layerskip.evaluation.replay import replay_grid

    L = engine.num_layers
    grid = replay_grid(engine, tokenizer, task, candidate_layers(L), args.speculations, args.thresholds,
                       max_new_tokens=args.max_new_tokens)
    grid.sort(key=lambda r: -r["predicted_speedup"])
    n = args.max_new_tokens
    configs = {"autoregressive": dict(max_new_tokens=n)}
    stored = model_defaults(model)
    if stored.get("exit_layer"):
        configs["stored"] = dict(strategy="self_speculative", max_new_tokens=n)
    for r in grid[:args.top]:
        name = f"E{r['exit_layer']}_d{r['num_speculations']}_C{r['confidence_threshold']:g}"
        configs[name] = dict(strategy="self_speculative", exit_layer=r["exit_layer"],
                             num_speculations=r["num_speculations"], confidence_threshold=r["confidence_threshold"],
                             max_new_tokens=n)
    configs["auto"] = dict(strategy="self_speculative", exit_layer="auto", max_new_tokens=n)
    if args.auto_threshold is not None:
        configs["auto"]["confidence_threshold"] = args.auto_threshold
    stops = [tuple(s.stop_strings) for s in task.samples]
    results = timed(engine, prompts, configs, tokenizer, stops)
    static = {k: v for k, v in results.items() if k not in ("autoregressive", "auto")}
    best = max(static, key=lambda k: static[k]["tokens_per_second"])
    report = {"model": args.model or "built-in", "prompts": f"{args.prompts}: {len(prompts)} prompts"
              + f" ({prompt_skip(args)}..{prompt_skip(args) + len(prompts) - 1}"
              + ("; the built-in model's stored settings were tuned on 0..23)" if args.prompts == "heldout" else ")"),
              "replay_top": grid[:args.top * 2], "results": results, "best_static": best}
    return confirmed(report, engine, prompts, configs, tokenizer, stops, args.confirm)


def confirmed(report: dict, engine, prompts, configs: dict, tokenizer, stops, confirm: bool) -> dict:
    """The ratios of auto to the best static cell and to the stored settings. With `confirm`, they come from a
    second timed pass of autoregressive, the stored settings, the best cell and auto (auto's carried estimates
    dropped first): the best cell is the fastest of several noisy timings, so its own timing overstates it
    (the winner's curse); a pass that did not choose it does not."""
    results, best = report["results"], report["best_static"]
    if confirm:
        engine.auto_memory.clear()
        names = [n for n in ("autoregressive", "stored", best, "auto") if n in configs]
        results = report["confirmation"] = timed(engine, prompts, {n: configs[n] for n in dict.fromkeys(names)},
                                                 tokenizer, stops)
        report["selection_auto_over_best_static"] = (report["results"]["auto"]["tokens_per_second"]
                                                     / report["results"][best]["tokens_per_second"])
    auto_speed = results["auto"]["tokens_per_second"]
    report["auto_over_best_static"] = auto_speed / results[best]["tokens_per_second"]
    report["auto_over_stored"] = auto_speed / results["stored"]["tokens_per_second"] if "stored" in results else None
    return report


def synthetic(args) -> dict:
    from layerskip.testing import make_exact_from, make_random_model

    torch.set_num_threads(args.threads)
    model = make_random_model("llama", num_layers=16, hidden_size=768, intermediate_size=2048, num_heads=12,
                              vocab_size=32000, max_position_embeddings=2048, seed=0)
    make_exact_from(model, 4)
    engine = layerskip.prepare(model, tune=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (64,), generator=g).tolist() for _ in range(args.limit)]
    n = args.max_new_tokens
    configs = {"autoregressive": dict(max_new_tokens=n, eos_token_id=[])}
    for d in (4, 8, 12):
        configs[f"E4_d{d}"] = dict(strategy="self_speculative", exit_layer=4, num_speculations=d, max_new_tokens=n,
                                   eos_token_id=[])
    configs["auto"] = dict(strategy="self_speculative", exit_layer="auto", max_new_tokens=n, eos_token_id=[])
    results = timed(engine, prompts, configs, None, [()] * len(prompts))
    static = {k: v for k, v in results.items() if k.startswith("E4")}
    best = max(static, key=lambda k: static[k]["tokens_per_second"])
    report = {"model": "synthetic 16x768 Llama, exact draft at E = 4 (layers >= 4 identity)",
              "prompts": f"{len(prompts)} random 64-token prompts", "results": results, "best_static": best}
    return confirmed(report, engine, prompts, configs, None, [()] * len(prompts), args.confirm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p)
    p.add_argument("--synthetic", action="store_true", help="the exact-draft synthetic model instead")
    p.add_argument("--speculations", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3, 4, 6, 8, 10, 12])
    p.add_argument("--thresholds", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.3, 0.5, 0.7])
    p.add_argument("--auto-threshold", type=float, default=None,
                   help="auto's confidence threshold (default: the model's stored one; auto chooses E and d, not C)")
    p.add_argument("--top", type=int, default=3, help="replayed cells to time")
    p.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=True,
                   help="report the ratios from a second timed pass, not the one that chose the best cell")
    args = p.parse_args()
    report = synthetic(args) if args.synthetic else real_model(args)
    report["machine"] = f"{machine_name()}, {args.threads} threads, fp32"
    report["max_new_tokens"] = args.max_new_tokens
    for prefix, results in (("", report["results"]), ("confirmation: ", report.get("confirmation", {}))):
        for name, r in results.items():
            print(f"{prefix}{name:22s} {r['tokens_per_second']:7.1f} tok/s  {r['speedup']:.2f}x  acc "
                  f"{r['acceptance_rate'] if r['acceptance_rate'] is None else round(r['acceptance_rate'], 2)}  "
                  f"identical {r['identical_to_autoregressive']}  {r.get('choices', '')}")
    print(f"auto / best static ({report['best_static']}): {report['auto_over_best_static']:.3f}"
          + (f"; auto / stored: {report['auto_over_stored']:.3f}" if report.get("auto_over_stored") else ""))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
