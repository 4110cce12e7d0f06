"""Where `exit_layer="auto"` gains or loses against the stored settings: per prompt, and every switch of E.

For each prompt: autoregressive, the stored settings and `auto` in turn (the order reversed every other prompt),
each timed once, on one engine (so auto's estimates carry from prompt to prompt, as in `auto_speed.py`). Reported
per prompt: each one's speedup over autoregressive, auto over stored, both's round counts, and the rounds auto spent
at each E; and every switch of E auto made: prompt, round, from, to, whether on a prediction (a trial, held until
measured) or on measured speeds, the two measured speeds, and what the plan valued each switchable layer at just
before (its measured speed, else its prediction scaled by the current layer's measured / predicted, over the
current layer's: what `AutoPlan.choose` compares with SWITCH_GAIN; recomputed here, where choose reuses the other
layers' predictions from the last probe round, so the two can differ a little). A diagnostic: one timing per
prompt and strategy, so a single ratio moves by +-10%; `auto_speed.py` gives the figures.

    python benchmarks/auto_trace.py [--model M] [--prompts heldout|thirdparty|humaneval] [--skip 24] [--limit 16]
        [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
import statistics

import layerskip
from layerskip.decoding import auto
from layerskip.files import write_json
from layerskip.runtime import machine_name

from auto_speed import add_prompt_args, prepared, prompt_skip


def valued(plan: auto.AutoPlan, B: int) -> dict[int, float]:
    """What plan.choose(B) would value each layer it may switch to at, over the current layer's value."""
    if plan.rounds < plan.warmup or plan._on_trial(B):
        return {}
    known = plan._switchable(B)
    if not known:
        return {}
    predicted = plan.best_round(plan.exit_layer, B)[0]
    here = plan._measured(plan.exit_layer, B)
    scale = here / predicted if here else 1.0
    return {E: (plan._measured(E, B) or plan.best_round(E, B)[0] * scale) / (here or predicted) for E in known}


def traced(switches: list, prompt: list[int]):
    """Wrap AutoPlan.choose to record every switch of E into `switches` (prompt[0]: the prompt being decoded)."""
    choose = auto.AutoPlan.choose

    def wrapper(plan, B):
        before, values = plan.exit_layer, valued(plan, B)
        out = choose(plan, B)
        if out[0] != before:
            trial = plan._trial is not None and plan._trial == (out[0], plan.rounds)
            switches.append({"prompt": prompt[0], "round": plan.rounds, "from": before, "to": out[0],
                             "on": "prediction (trial)" if trial else "measured speeds",
                             "measured_from": plan._measured(before, B), "measured_to": plan._measured(out[0], B),
                             "valued_over_current": {str(E): round(v, 3) for E, v in sorted(values.items())}})
        return out

    auto.AutoPlan.choose = wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p)
    args = p.parse_args()
    model, tokenizer, engine, task, prompts = prepared(args)
    n = args.max_new_tokens
    configs = {"autoregressive": {}, "stored": dict(strategy="self_speculative"),
               "auto": dict(strategy="self_speculative", exit_layer="auto")}
    for cfg in configs.values():  # warm-up: kernels, auto's cost table
        layerskip.generate(engine, prompts[0], tokenizer=tokenizer, max_new_tokens=16, **cfg)
    switches, current = [], [0]
    traced(switches, current)
    rows = []
    for i, (ids, sample) in enumerate(zip(prompts, task.samples)):
        current[0] = i
        out = {}
        for name in list(configs)[::1 if i % 2 else -1]:
            out[name] = layerskip.generate(engine, ids, tokenizer=tokenizer, max_new_tokens=n,
                                           stop_strings=tuple(sample.stop_strings), **configs[name]).stats
        speed = {name: s.num_new_tokens / s.total_s for name, s in out.items()}
        row = {"prompt": i, "autoregressive_tokens_per_second": speed["autoregressive"],
               "stored_speedup": speed["stored"] / speed["autoregressive"],
               "auto_speedup": speed["auto"] / speed["autoregressive"],
               "auto_over_stored": speed["auto"] / speed["stored"],
               "rounds_stored": out["stored"].rounds, "rounds_auto": out["auto"].rounds,
               "auto_rounds_at": dict(collections.Counter(out["auto"].exit_layer_per_round).most_common())}
        rows.append(row)
        print(f"{i:2d} stored {row['stored_speedup']:.2f}x  auto {row['auto_speedup']:.2f}x  auto / stored "
              f"{row['auto_over_stored']:.3f}  rounds {row['rounds_stored']} / {row['rounds_auto']}  auto at E "
              + ", ".join(f"{E}: {k}" for E, k in row["auto_rounds_at"].items()))
    for s in switches:
        print(f"prompt {s['prompt']:2d} round {s['round']:3d}: E {s['from']} -> {s['to']} on {s['on']}; valued over "
              "current: " + (" ".join(f"{E}: {v:.2f}" for E, v in s["valued_over_current"].items()) or "-"))
    mean = statistics.mean(r["auto_over_stored"] for r in rows)
    print(f"mean auto / stored over {len(rows)} prompts: {mean:.3f}; {len(switches)} switches")
    if args.json:
        write_json(args.json, {"model": args.model or "built-in", "prompts": f"{args.prompts}: {len(rows)} prompts"
                               + f" from {prompt_skip(args)}",
                               "machine": f"{machine_name()}, {args.threads} threads, fp32",
                               "max_new_tokens": n, "mean_auto_over_stored": mean, "per_prompt": rows,
                               "switches": switches})


if __name__ == "__main__":
    main()
