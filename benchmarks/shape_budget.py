"""What exit agreement a built-in-model shape needs for a target speedup on this machine.

For each candidate shape within the package's size budget (<= 25 MB of bf16 weights), random weights, fp32:
time a draft step t_E, an autoregressive step t_ar and verify passes t_v(k) for k = 0..8 with the cost model
(`layerskip.evaluation.cost_model.measure_step_times`, the decoding engine's own forward, the 1024-token draft
vocabulary), then take the i.i.d. acceptance model n̄(α, k) = (1 − α^(k+1)) / (1 − α) and report, per exit
layer E, the smallest α whose best d gives the target, with the real verify costs and with a flat verify pass
(t_v(k) = t_v(0)). Timings do not depend on the weights, so this prices a shape before anyone trains it.

Real acceptance is bursty (easy spans, hard tokens) and the confidence threshold skips the hard ones, so a
trained model does somewhat better than the i.i.d. α suggests (docs/default_model.md compares the two).

    python benchmarks/shape_budget.py [--threads 1] [--target 1.5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from layerskip.evaluation.cost_model import expected_tokens_per_round, measure_step_times
from layerskip.runtime import cpu_name
from layerskip.testing import make_random_model

# name: (layers, width, MLP width, query heads, key-value heads); all with the built-in model's vocab 4096, tied
SHAPES = {
    "8x384 (shipped)": (8, 384, 768, 6, 2),
    "12x320": (12, 320, 640, 5, 1),
    "12x288": (12, 288, 768, 4, 2),
    "16x256": (16, 256, 640, 4, 2),
}
KS = range(0, 9)
ALPHAS = (0.75, 0.8, 0.85, 0.9)


def best_speedup(times, alpha: float, flat: bool = False) -> float:
    """max over k of n̄(α, k) t_ar / (k t_E + t_v(k)); flat: t_v(k) = t_v(0)."""
    return max(expected_tokens_per_round(alpha, k) * times.t_ar
               / (k * times.t_draft + times.t_verify[0 if flat else k]) for k in KS)


def alpha_needed(times, target: float, flat: bool = False) -> float | None:
    return next((a / 100 for a in range(50, 101) if best_speedup(times, a / 100, flat) >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", type=float, default=1.5)
    p.add_argument("--context", type=int, default=250, help="positions in the cache (default 250)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (L, H, M, heads, kv) in SHAPES.items():
        model = make_random_model("llama", num_layers=L, hidden_size=H, intermediate_size=M, num_heads=heads,
                                  num_kv_heads=kv, vocab_size=4096, max_position_embeddings=1024,
                                  tie_word_embeddings=True)
        params = sum(p.numel() for p in model.parameters())
        vocab = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:1024]
        print(f"{name}: {params / 1e6:.1f}M parameters, {2 * params / 1e6:.1f} MB in bf16", flush=True)
        for E in sorted({L // 4, (3 * L) // 8, L // 2}):
            t = measure_step_times(model, E, KS, context_len=args.context, draft_vocab=vocab)
            row = dict(shape=name, layers=L, exit_layer=E, params=params, t_ar_ms=t.t_ar * 1e3,
                       draft_over_ar=t.t_draft / t.t_ar,
                       verify_over_ar={k: t.t_verify[k] / t.t_ar for k in (0, 2, 4, 8)},
                       alpha_needed=alpha_needed(t, args.target), alpha_needed_flat=alpha_needed(t, args.target, True),
                       speedup_at={a: best_speedup(t, a) for a in ALPHAS})
            rows.append(row)
            v = row["verify_over_ar"]
            print(f"  E={E}: t_ar {row['t_ar_ms']:.2f} ms, t_E/t_ar {row['draft_over_ar']:.2f}, "
                  f"t_v(0/2/4/8)/t_ar {v[0]:.2f}/{v[2]:.2f}/{v[4]:.2f}/{v[8]:.2f}; "
                  f"α for {args.target:g}x: {row['alpha_needed']} (flat verify: {row['alpha_needed_flat']}); "
                  f"at α {'/'.join(f'{a:g}' for a in ALPHAS)}: "
                  + " ".join(f"{s:.2f}x" for s in row["speedup_at"].values()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=cpu_name(), threads=args.threads,
                           target=args.target, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
