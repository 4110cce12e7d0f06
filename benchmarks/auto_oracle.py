"""What choosing (E, d, C) per prompt could gain over one static cell: an upper bound for `exit_layer="auto"`.

For one model and prompt set (as benchmarks/auto_speed.py makes them): one autoregressive decode per prompt,
traced through every candidate exit (`sweep --replay`'s exact-acceptance replay), step times measured once per E,
then every (E, d, C) cell's predicted speedup for each prompt alone. Reported: the stored cell and the set's best
cell (both over the whole set), and the per-prompt oracle: every prompt decoded at its own best cell, the time
summed over the set. oracle / best is what a choice per prompt could gain at most over the best static cell (a
choice per round could gain more; auto also pays its probes and detours), also over E and d alone at the stored
threshold (what auto chooses). Predictions, not timings.

    python benchmarks/auto_oracle.py [--model M] --prompts heldout|thirdparty|humaneval [--limit 16] [--json FILE]
"""
from __future__ import annotations

import argparse

from tqdm import tqdm

from layerskip.decoding.auto import candidate_layers
from layerskip.decoding.config import DecodeConfig, model_defaults
from layerskip.evaluation.cost_model import measure_step_times
from layerskip.evaluation.replay import decode_and_trace, predicted_speedup, replay_rounds
from layerskip.files import write_json
from layerskip.runtime import machine_name

from auto_speed import add_prompt_args, prepared


def cell_cost(traces, times, E: int, d: int, c: float, n: int) -> list[float]:
    """Each prompt's replayed self-speculative time at (E, d, C), in autoregressive steps: its tokens over the
    speedup `sweep --replay` predicts for it alone."""
    return [len(t.tokens) / predicted_speedup([replay_rounds(t, E, d, c, n)], [len(t.tokens)], times[E])
            for t in traces]


def per_prompt_oracle(cells: dict, candidates: list, prompts: int, ar: int) -> tuple[list, float | None]:
    """Each prompt's cheapest cell among `candidates`, and the speedup of the set decoded so."""
    own = [min(candidates, key=lambda cell: cells[cell][i]) for i in range(prompts)] if candidates else []
    return own, (ar / sum(cells[cell][i] for i, cell in enumerate(own)) if own else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p)
    p.add_argument("--speculations", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3, 4, 6, 8, 10, 12])
    p.add_argument("--thresholds", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.3, 0.5, 0.7])
    args = p.parse_args()
    model, tokenizer, stack, task, _ = prepared(args)
    n, layers = args.max_new_tokens, candidate_layers(stack.num_layers)
    vocab = DecodeConfig("self_speculative").resolve(model, warn=False).draft_vocab_tensor(stack.device)
    traces, context = decode_and_trace(stack, tokenizer, task, layers, vocab, n)
    times = {E: measure_step_times(stack, E, range(0, max(args.speculations) + 1), context_len=context,
                                   draft_vocab=vocab) for E in tqdm(layers, desc="step times", leave=False)}
    cells = {(E, d, c): cell_cost(traces, times, E, d, c, n)
             for E in layers for d in args.speculations for c in args.thresholds}
    ar = sum(len(t.tokens) for t in traces)  # autoregressive steps
    speedup = {cell: ar / sum(per) for cell, per in cells.items()}
    best = max(speedup, key=speedup.get)
    own, oracle = per_prompt_oracle(cells, list(cells), len(traces), ar)
    stored = model_defaults(model)
    key = (stored.get("exit_layer"), stored.get("num_speculations"), stored.get("confidence_threshold"))
    fixed_c = [cell for cell in cells if cell[2] == key[2]]  # auto's choice: E and d, the stored threshold kept
    own_e_d, oracle_e_d = per_prompt_oracle(cells, fixed_c, len(traces), ar)
    name = lambda cell: f"E{cell[0]}_d{cell[1]}_C{cell[2]:g}"
    report = {"model": args.model or "built-in", "prompts": f"{args.prompts}: {len(traces)} prompts",
              "machine": f"{machine_name()}, {args.threads} threads, fp32",
              "max_new_tokens": n, "best_cell": name(best), "best_speedup": speedup[best],
              "stored_cell": name(key) if key in speedup else None, "stored_speedup": speedup.get(key),
              "oracle_speedup": oracle, "oracle_over_best": oracle / speedup[best],
              "per_prompt_best": [name(c) for c in own],
              "oracle_at_stored_threshold": oracle_e_d,
              "oracle_at_stored_threshold_over_best": oracle_e_d / speedup[best] if oracle_e_d else None,
              "per_prompt_best_at_stored_threshold": [name(c) for c in own_e_d]}
    stored_text = (f"stored {report['stored_cell']}: {report['stored_speedup']:.2f}x" if report["stored_cell"]
                   else "the stored cell is outside this grid" if any(key) else "no stored cell")
    print(f"best cell {report['best_cell']}: {speedup[best]:.2f}x; {stored_text}; per-prompt oracle {oracle:.2f}x "
          f"({oracle / speedup[best]:.3f} of the best cell)")
    print("per-prompt best:", " ".join(report["per_prompt_best"]))
    if oracle_e_d:
        print(f"per-prompt oracle over E and d only (threshold {key[2]:g}, as auto chooses): {oracle_e_d:.2f}x "
              f"({oracle_e_d / speedup[best]:.3f} of the best cell):", " ".join(report["per_prompt_best_at_stored_threshold"]))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
