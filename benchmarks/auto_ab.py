"""exit_layer="auto" against the model's stored settings, paired per prompt and repeated: a ratio with its spread.

auto_speed.py times each contender once per prompt after a sweep, so one of its figures moves by a few percent from
run to run. This benchmark times only autoregressive decoding, the stored settings and `auto` (and, with --variants,
auto with one of its rules changed), each prompt by all of them one after another (the order rotating with the
prompt and the repetition), `--repeats` times over the set. Reported: each one's tokens/s over the stored settings'
(total tokens over total seconds), with a 90% interval from resampling the prompts (bootstrap, 2000 draws, the
repetitions of a prompt kept together), and auto's per-prompt ratios per repetition. auto's carried estimates are
dropped before each repetition, so every repetition is a cold start over the set; each variant carries its own.
With --again the stored settings are timed a second time as a contender of their own: "stored-again / stored" is
what a ratio of two identical configurations comes to here, the floor under any "auto >= the stored settings".
Every output must equal autoregressive decoding.

Variants (experiments, not shipped):
  pinned    auto never leaves the model's stored E: it chooses d alone
  gain      a switch to a layer measured faster lately needs SWITCH_GAIN too (shipped: MEASURED_GAIN = 1.0)
  leave     auto as shipped before 2026-12-08: no quiet rounds (AutoPlan._quiet): it probes and chooses at the
            stored settings too, and may leave the stored E however fast it runs
  keep12    the stored settings run as they are while the stored E runs at 1.2x an autoregressive step or faster
            (shipped: 1.0x, KEEP_PAYING)
  keep15    the same at 1.5x
  modelled  a round's "measured" speed is its tokens over the cost model's seconds for the drafts it made, not the
            clock's (batch 1 only): the machine's slow spells no longer steer the choice

    python benchmarks/auto_ab.py [--model M] [--prompts heldout|thirdparty|humaneval] [--skip S] [--limit 32]
        [--repeats 3] [--variants pinned,gain] [--again] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import random

import layerskip
from layerskip.decoding import auto
from layerskip.files import write_json

from auto_speed import add_prompt_args, prepared, report_header


def _pinned(shipped):
    return lambda plan, B: [] if plan.stored_start else shipped(plan, B)


def _modelled_seconds(plan, E: int, B: int, r) -> float:
    """What the cost model says a round of B rows at E that drafted r.drafted (an AR step: E = AR) costs."""
    c, L = plan.costs, plan.num_layers
    if E == auto.AR:
        return c.autoregressive(L, B)
    k = r.drafted
    return ((k + 1) * (c.fixed + E * c.at_layer(B)) + (k + r.unsure) * c.at_draft_head(B) + c.fixed
            + (L - E) * c.at_layer(B * (k + 1)) + c.at_head(B * (k + 1)))


def _modelled():
    """observe_speed / observe_round patches: the round's seconds from the cost model, not the clock (batch 1, where
    observe_speed comes just before observe_round)."""
    shipped_speed, shipped_round = auto.AutoPlan.observe_speed, auto.AutoPlan.observe_round

    def speed(plan, E, B, tokens, seconds):
        plan._pending_speed = (E, B, tokens)

    def round_(plan, E, r):
        e, B, tokens = plan.__dict__.pop("_pending_speed", (None, 1, 0))
        if e is not None:
            shipped_speed(plan, e, B, tokens, _modelled_seconds(plan, e, B, r))
        shipped_round(plan, E, r)
    return [(auto.AutoPlan, "observe_speed", speed), (auto.AutoPlan, "observe_round", round_)]


# name -> () -> [(owner, attribute, value in place of the shipped one)]
VARIANTS = {"pinned": lambda: [(auto.AutoPlan, "_switchable", _pinned(auto.AutoPlan._switchable))],
            "gain": lambda: [(auto, "MEASURED_GAIN", auto.SWITCH_GAIN)],
            "leave": lambda: [(auto.AutoPlan, "_quiet", lambda plan, B: False)],
            "keep12": lambda: [(auto, "KEEP_PAYING", 1.2)],
            "keep15": lambda: [(auto, "KEEP_PAYING", 1.5)],
            "modelled": _modelled}


@contextlib.contextmanager
def variant(name: str):
    """auto with variant `name`'s rules in place of the shipped ones (no change for the others)."""
    patches = VARIANTS[name]() if name in VARIANTS else []
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, value in patches:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def ratio_interval(seconds: dict, a: str, b: str, draws: int = 2000, seed: int = 0) -> tuple:
    """(ratio, 5th, 95th percentile) of a's tokens/s over b's, summed over prompts (seconds[name][prompt]; the
    outputs are identical, so the tokens are too and the ratio is b's seconds over a's); the interval resamples
    prompts."""
    def ratio(idx):
        return sum(seconds[b][i] for i in idx) / sum(seconds[a][i] for i in idx)

    n, rng = len(seconds[a]), random.Random(seed)
    boot = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    return ratio(range(n)), boot[int(0.05 * draws)], boot[int(0.95 * draws) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p, limit=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", type=lambda t: [v for v in t.split(",") if v], default=[],
                   help=f"auto variants to time beside it: {', '.join(VARIANTS)}")
    p.add_argument("--again", action="store_true",
                   help="time the stored settings twice (\"stored-again\"): an A/A pair, the noise floor of a ratio")
    args = p.parse_args()
    if set(args.variants) - set(VARIANTS):
        p.error(f"unknown variant(s) {', '.join(sorted(set(args.variants) - set(VARIANTS)))}; "
                f"choose from {', '.join(VARIANTS)}")
    model, tokenizer, engine, task, prompts = prepared(args)
    n = args.max_new_tokens
    autos = ["auto"] + args.variants
    names = ["autoregressive", "stored"] + ["stored-again"] * args.again + autos
    stored = dict(strategy="self_speculative", max_new_tokens=n)
    configs = {"autoregressive": dict(max_new_tokens=n), "stored": stored, "stored-again": stored,
               **{a: dict(strategy="self_speculative", exit_layer="auto", max_new_tokens=n) for a in autos}}
    memories = {a: {} for a in autos}  # each auto its own carried estimates

    def run(name, ids, stop, **extra):
        if name in memories:
            engine.auto_memory = memories[name]
        with variant(name):
            return layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=stop,
                                      **{**configs[name], **extra})

    stops = [tuple(s.stop_strings) for s in task.samples]
    for name in names:  # warm-up: kernels, auto's cost table
        run(name, prompts[0], (), max_new_tokens=16)
    seconds = {name: [0.0] * len(prompts) for name in names}
    tokens, identical, per_repeat, rounds = [0] * len(prompts), True, [], ([], [])
    for rep in range(args.repeats):
        for m in memories.values():
            m.clear()
        per_repeat.append([])
        for i, ids in enumerate(prompts):
            shift = (i + rep) % len(names)
            out = {name: run(name, ids, stops[i]) for name in names[shift:] + names[:shift]}
            for name, r in out.items():
                seconds[name][i] += r.stats.total_s
            tokens[i] += out["autoregressive"].stats.num_new_tokens
            identical &= all(r.token_ids == out["autoregressive"].token_ids for r in out.values())
            per_repeat[-1].append(out["stored"].stats.total_s / out["auto"].stats.total_s)
            rounds[0].extend(out["auto"].stats.exit_layer_per_round)
            rounds[1].extend(out["auto"].stats.speculations_per_round)
        print(f"repetition {rep + 1}/{args.repeats}: auto / stored so far "
              f"{ratio_interval(seconds, 'auto', 'stored')[0]:.3f}", flush=True)
    ratios = {}
    pairs = [(x, "stored") for x in names if x != "stored"] + [(v, "auto") for v in args.variants]
    for a, b in pairs + [("auto", "stored-again")] * args.again:
        r, lo, hi = ratio_interval(seconds, a, b)
        ratios[f"{a}/{b}"] = {"ratio": r, "p5": lo, "p95": hi}
        print(f"{a} / {b}: {r:.3f}  (90% interval {lo:.3f}-{hi:.3f})")
    report = {**report_header(args, prompts), "repeats": args.repeats, "variants": args.variants, "again": args.again,
              "ratios": ratios, "tokens_per_second": {name: sum(tokens) / sum(seconds[name]) for name in names},
              "per_prompt_auto_over_stored": per_repeat, "auto_choices": auto.summary(*rounds),
              "identical_to_autoregressive": identical}
    print(f"identical to autoregressive: {identical}; auto chose {report['auto_choices']}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
