"""Where auto's gap to the stored settings goes: its choices, its probes' shadow heads, and its bookkeeping.

Each prompt is decoded by `exit_layer="auto"` first, its choices recorded (every round's E, k and probe layers), and
then, in rotating order, by the stored settings and two replays of auto's recorded choices with no plan behind them:
  replay  the same rounds with the same probes (their shadow heads run, their outcomes thrown away): auto without
          its choosing and observing, the Python that runs between rounds
  bare    the same rounds without the probes: auto's choices alone
Greedy decoding is deterministic, so the replays make exactly auto's rounds (checked: identical output). Then
auto / replay is what choosing and observing cost inside a real decode, replay / bare what the shadow heads cost,
and bare / stored what auto's choices gain or lose, each with a 90% interval from resampling prompts. auto's
carried estimates are dropped before each repetition, as in auto_ab.py.

    cd benchmarks && python auto_decompose.py [--prompts heldout|thirdparty|humaneval] [--skip S] [--limit 24]
        [--repeats 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib

import layerskip
from layerskip.decoding import auto
from layerskip.files import write_json

from auto_ab import ratio_interval
from auto_speed import add_prompt_args, prepared, report_header


class ReplayPlan:
    """Plays back recorded (E, k, probes) choices; observes nothing. shadows=False: the probes dropped."""

    def __init__(self, choices: list, shadows: bool):
        self.choices, self.shadows, self.i = choices, shadows, 0

    def choose(self, B: int):
        E, k, probes = self.choices[self.i]
        self.i += 1
        return E, k, probes if self.shadows else ()

    def observe_speed(self, *args) -> None:
        pass

    def observe_round(self, *args) -> None:
        pass


@contextlib.contextmanager
def recording(choices: list):
    """auto as shipped, every choice appended to `choices`."""
    shipped = auto.AutoPlan.choose

    def choose(plan, B):
        c = shipped(plan, B)
        choices.append(c)
        return c
    auto.AutoPlan.choose = choose
    try:
        yield
    finally:
        auto.AutoPlan.choose = shipped


@contextlib.contextmanager
def replaying(choices: list, shadows: bool):
    """new_plan returns a ReplayPlan of `choices` (the decode must make the same rounds: asserted by the caller)."""
    shipped = auto.new_plan
    plan = ReplayPlan(choices, shadows)
    auto.new_plan = lambda *a, **kw: plan
    try:
        yield plan
    finally:
        auto.new_plan = shipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p, limit=24)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    model, tokenizer, engine, task, prompts = prepared(args)
    n = args.max_new_tokens
    stops = [tuple(s.stop_strings) for s in task.samples]
    memory: dict = {}

    def generate(ids, stop, **cfg):
        return layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=stop, strategy="self_speculative",
                                  max_new_tokens=cfg.pop("max_new_tokens", n), **cfg)

    def run_auto(ids, stop, **cfg):
        engine.auto_memory = memory
        choices: list = []
        with recording(choices):
            return generate(ids, stop, exit_layer="auto", **cfg), choices

    def run_replay(choices, shadows, ids, stop, **cfg):
        with replaying(choices, shadows) as plan:
            r = generate(ids, stop, exit_layer="auto", **cfg)
        assert plan.i == len(choices), "the replay made other rounds than auto"
        return r

    _, choices = run_auto(prompts[0], (), max_new_tokens=16)  # warm-up: kernels, auto's cost table
    generate(prompts[0], (), max_new_tokens=16)
    for shadows in (True, False):
        run_replay(choices, shadows, prompts[0], (), max_new_tokens=16)
    names = ["auto", "stored", "replay", "bare"]
    seconds = {name: [0.0] * len(prompts) for name in names}
    identical, rounds, probe_rounds = True, 0, 0
    for rep in range(args.repeats):
        memory.clear()
        for i, ids in enumerate(prompts):
            out = {}
            out["auto"], choices = run_auto(ids, stops[i])
            rest = {"stored": lambda: generate(ids, stops[i]),
                    "replay": lambda: run_replay(choices, True, ids, stops[i]),
                    "bare": lambda: run_replay(choices, False, ids, stops[i])}
            order = list(rest)
            shift = (i + rep) % len(order)
            for name in order[shift:] + order[:shift]:
                out[name] = rest[name]()
            for name, r in out.items():
                seconds[name][i] += r.stats.total_s
            identical &= all(r.token_ids == out["stored"].token_ids for r in out.values())
            rounds += len(choices)
            probe_rounds += sum(bool(c[2]) for c in choices)
        print(f"repetition {rep + 1}/{args.repeats}: auto / stored so far "
              f"{ratio_interval(seconds, 'auto', 'stored')[0]:.3f}", flush=True)
    ratios = {}
    for a, b, what in [("auto", "stored", "the target"), ("auto", "replay", "choosing and observing"),
                       ("replay", "bare", "the probes' shadow heads"), ("bare", "stored", "auto's choices alone")]:
        r, lo, hi = ratio_interval(seconds, a, b)
        ratios[f"{a}/{b}"] = {"ratio": r, "p5": lo, "p95": hi, "measures": what}
        print(f"{a} / {b}: {r:.3f}  (90% interval {lo:.3f}-{hi:.3f})  {what}")
    report = {**report_header(args, prompts), "repeats": args.repeats, "ratios": ratios,
              "seconds": {name: sum(s) for name, s in seconds.items()},
              "auto_rounds": rounds, "auto_probe_rounds": probe_rounds, "identical_to_stored": identical}
    print(f"identical output: {identical}; {rounds} rounds of auto, {probe_rounds} of them probes")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
