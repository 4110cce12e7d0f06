"""Training benchmark: what layer dropout saves, what the early-exit loss costs, in time and peak memory.

    python benchmarks/training_bench.py [--layers 16 --hidden 512 --vocab 4096 --seq-len 256 --batch-size 4]

One training step = the LayerSkip forward + backward + AdamW step, on one random Llama model and one batch.
Measured side by side in one run, each configuration once per round, in a rotating order, medians reported:
  last        last-layer loss only, no layer dropout                  (the baseline)
  dropout     last-layer loss, layer dropout p_max 0.2, exponential D(l), S(t) = 1
  rotational  early-exit loss, rotational curriculum R = 8, e_scale 0.2, no layer dropout
  hf          transformers' own forward and loss                      (reference for our forward's overhead)
Step t advances every round, so the rotation phase and the dropout masks vary as in training; 16 rounds visit
each of the 8 rotation phases twice.

Peak memory: each configuration in a fresh subprocess (imports, build, two steps: the first allocates AdamW's
state), reading the process's peak resident set size (VmHWM) minus its RSS right after the imports; so the figure is the model + gradients + optimizer state + activations + loss. The subprocesses run
with MALLOC_MMAP_THRESHOLD_=131072: every tensor of 128 KiB or more is its own mapping, unmapped when freed,
so RSS follows the live tensors and its peak is theirs (with glibc's defaults, freed memory stays in the heap
and the high-water mark can sit on an earlier, unrelated peak).
  last        last-layer loss only
  all         every layer an exit (curriculum none), our shared-head loss
  all_naive   every layer an exit with plain autograd cross-entropy per exit (every exit's logits kept
              for backward): what the shared-head loss avoids
Targets (issue 5): dropout <= (1 - mean p + 0.05) x last; rotational <= 1.15 x last; all <= 1.25 x last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from layerskip.runtime import cpu_name
from layerskip.testing import make_random_model
from layerskip.training.curriculum import Curriculum
from layerskip.training.layer_dropout import LayerDropout
from layerskip.training.model import LayerSkipModel

TIMED = ("last", "dropout", "rotational", "hf")
MEMORY = ("last", "all", "all_naive")


def build(args):
    """(causal LM, AdamW, input ids) for the benchmark shape."""
    model = make_random_model(
        "llama", num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=max(args.seq_len, 512), seed=0,
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    return model, opt, ids


def wrapper(model, kind: str, args) -> LayerSkipModel | None:
    L = args.layers
    if kind == "hf":
        return None
    p_max = args.p_max if kind == "dropout" else 0.0
    curriculum = {"rotational": Curriculum("rotational", L, rotation=args.rotation), "all": Curriculum("none", L)}
    return LayerSkipModel(model, LayerDropout(L, p_max, depth="exponential"),
                          curriculum.get(kind, Curriculum("last", L)), early_exit_scale=args.e_scale)


def loss_of(kind: str, model, wrapped, ids, t: int) -> torch.Tensor:
    if kind == "hf":
        return model(input_ids=ids, labels=ids).loss
    if kind == "all_naive":  # every exit's full logits kept alive for backward
        hidden = wrapped.hidden_states(ids)
        L = len(hidden)
        e = [wrapped.early_exit_scale * l * (l + 1) / 2 for l in range(L - 1)]
        e.append(L - 1 + wrapped.early_exit_scale * (L - 2) * (L - 1) / 2)
        total = 0.0
        for l, h in hidden.items():
            logits = model.lm_head(model.model.norm(h[:, :-1]))  # (B, T-1, V)
            total = total + e[l] / sum(e) * F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return total
    return wrapped(ids, step=t).loss


def train_step(kind, model, wrapped, opt, ids, t) -> float:
    start = time.perf_counter()
    loss_of(kind, model, wrapped, ids, t).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_steps(args) -> dict:
    model, opt, ids = build(args)
    wrapped = {k: wrapper(model, k, args) for k in TIMED}
    for k in TIMED:  # warm-up: allocator, AdamW state, kernels for every shape
        for t in range(2):
            train_step(k, model, wrapped[k], opt, ids, t)
    times = {k: [] for k in TIMED}
    dropped = []
    for r in range(args.rounds):
        order = TIMED[r % len(TIMED):] + TIMED[: r % len(TIMED)]
        for k in order:
            times[k].append(train_step(k, model, wrapped[k], opt, ids, t=r))
        keep = wrapped["dropout"].layer_dropout.sample_keep(r, args.batch_size)
        dropped.append(1.0 - keep.float().mean().item())
    median = {k: statistics.median(v) for k, v in times.items()}
    mean_p = sum(wrapped["dropout"].layer_dropout.rates(0)) / args.layers
    return {
        "step_seconds_median": median,
        "step_seconds_all": times,
        "mean_p": mean_p,
        "realised_drop_fraction": sum(dropped) / len(dropped),
        "ratio_dropout": median["dropout"] / median["last"],
        "target_dropout": 1 - mean_p + 0.05,
        "ratio_rotational": median["rotational"] / median["last"],
        "target_rotational": 1.15,
        "ratio_hf": median["hf"] / median["last"],
    }


def _status_kib(field: str) -> int:
    """A /proc/self/status field in KiB: VmRSS (now) or VmHWM (the peak of this process image)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(kind: str, args) -> dict:
    """In a fresh process: peak RSS of two training steps of `kind`, above the RSS after imports (KiB)."""
    base = _status_kib("VmRSS")
    model, opt, ids = build(args)
    wrapped = wrapper(model, kind, args)
    for t in range(2):
        train_step(kind, model, wrapped, opt, ids, t)
    # VmHWM, not getrusage's ru_maxrss: that one survives fork + exec and so includes the parent's RSS
    peak = _status_kib("VmHWM")
    return {"kind": kind, "after_imports_kib": base, "peak_kib": peak, "training_kib": peak - base}


def measure_memory(args) -> dict:
    """Each MEMORY configuration in a fresh process. glibc is told to give every allocation of 128 KiB or more
    its own mapping, returned to the OS when freed, so the peak RSS is the peak of live tensors rather than a
    heap high-water mark that hides what is freed and reused."""
    out = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for kind in MEMORY:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", kind, *shape_argv(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    last = out["last"]["training_kib"]
    return {
        "runs": out,
        "ratio_all": out["all"]["training_kib"] / last,
        "ratio_all_naive": out["all_naive"]["training_kib"] / last,
        "target_all": 1.25,
    }


def shape_argv(args) -> list[str]:
    keys = ("layers", "hidden", "intermediate", "heads", "vocab", "seq_len", "batch_size", "threads", "p_max",
            "rotation", "e_scale")
    return [a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def report(result: dict, args) -> str:
    t, m = result["time"], result["memory"]
    med = t["step_seconds_median"]
    mib = {k: v["training_kib"] / 1024 for k, v in m["runs"].items()}
    ok = lambda good: "PASS" if good else "FAIL"  # noqa: E731
    lines = [
        f"model: Llama, {args.layers} layers, width {args.hidden}, MLP {args.intermediate}, {args.heads} heads, "
        f"vocab {args.vocab}; batch {args.batch_size} x {args.seq_len} tokens; fp32; {args.rounds} rounds",
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']}",
        "",
        "| configuration | median step (s) | ratio to last-layer-only | target |",
        "|---|---|---|---|",
        f"| last-layer loss only (baseline) | {med['last']:.3f} | 1.000 | |",
        f"| + layer dropout p_max {args.p_max} exp (mean p {t['mean_p']:.4f}) | {med['dropout']:.3f} | "
        f"{t['ratio_dropout']:.3f} | <= {t['target_dropout']:.3f} {ok(t['ratio_dropout'] <= t['target_dropout'])} |",
        f"| early-exit loss, rotational R={args.rotation} | {med['rotational']:.3f} | {t['ratio_rotational']:.3f} | "
        f"<= 1.15 {ok(t['ratio_rotational'] <= 1.15)} |",
        f"| transformers' own forward + loss (reference) | {med['hf']:.3f} | {t['ratio_hf']:.3f} | |",
        "",
        "| configuration | peak training memory (MiB) | ratio to last-layer-only | target |",
        "|---|---|---|---|",
        f"| last-layer loss only | {mib['last']:.0f} | 1.000 | |",
        f"| every layer an exit (curriculum none) | {mib['all']:.0f} | {m['ratio_all']:.3f} | "
        f"<= 1.25 {ok(m['ratio_all'] <= 1.25)} |",
        f"| every layer an exit, plain autograd CE (reference) | {mib['all_naive']:.0f} | "
        f"{m['ratio_all_naive']:.3f} | |",
        "",
        f"realised layer-row drop fraction: {t['realised_drop_fraction']:.4f}; "
        f"load average before/after: {result['load_before']} / {result['machine']['load_average']}",
    ]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/training_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    # 4096: the LM head is 0.66 of a layer's parameters, as in Llama 2 7B (0.65), the paper's model
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=16)  # a multiple of R: every rotation phase equally often
    # 1 thread by default: on a shared machine, OpenMP threads that wait on each other under load make step
    # times swing by 2-5x; pass --threads N on a dedicated one
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--p-max", type=float, default=0.2)
    p.add_argument("--rotation", type=int, default=8)
    p.add_argument("--e-scale", type=float, default=0.2)
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", choices=MEMORY, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return 0
    load_before = os.getloadavg()
    result = {"args": vars(args), "load_before": load_before}
    result["memory"] = measure_memory(args) if not args.skip_memory else None  # first: the parent is small
    result["time"] = time_steps(args)
    result["machine"] = machine()
    if result["memory"] is None:
        print(json.dumps(result["time"], indent=1, default=str))
    else:
        print(report(result, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
