"""The stored settings against static cells near them, paired per prompt: how flat the speed landscape is there.

Each prompt is decoded by autoregressive decoding, the model's stored settings and every `--cells` cell in turn (the
order rotating with the prompt and the repetition), `--repeats` times over the set. A cell is `d:C:tau` at the stored
exit layer: num_speculations d, confidence threshold C and, with tau > 0, an experimental second stop rule (not
shipped): drafting also stops once the product of the round's draft top probabilities falls below tau (the chance
that every draft so far is accepted, were the top probabilities calibrated). Reported: each one's tokens/s over the
stored settings' with a 90% interval from resampling prompts (auto_ab.ratio_interval), drafts and acceptance. Every
output must equal autoregressive decoding.

    python benchmarks/stored_neighbours.py [--prompts heldout|thirdparty|humaneval] [--skip S] [--limit 24]
        [--repeats 2] [--cells 8:0.6:0,12:0.7:0.3] [--json FILE]
"""
from __future__ import annotations

import argparse

import torch

import layerskip
from layerskip.decoding import self_speculative as ss
from layerskip.decoding.config import model_defaults
from layerskip.files import write_json

from auto_ab import ratio_interval
from auto_speed import add_prompt_args, prepared, report_header

_shipped_draft = ss.draft


def product_stop_draft(tau: float):
    """ss.draft with the product rule added (greedy only); tau <= 0: the shipped draft."""
    if tau <= 0:
        return _shipped_draft

    def draft(stack, cache, pending, pos, exit_layer, k, params, generator=None, *, vocab=None,
              confidence_threshold=0.0, taps=None):
        assert not params.do_sample, "the product rule is measured on greedy decoding only"
        h = stack.run(stack.embed(pending), 0, exit_layer, cache, pos, taps)
        exits, tokens, survive = [h], [], 1.0
        for i in range(k):
            logits = stack.logits(h[:, -1], vocab)
            top = float(torch.softmax(logits[0].float(), -1).max())
            survive *= top
            if not ss.confident(top, confidence_threshold) or survive < tau:
                break
            token = logits.argmax(-1, keepdim=True)
            tokens.append(vocab[token] if vocab is not None else token)
            if i + 1 < k:
                h = stack.run(stack.embed(tokens[-1]), 0, exit_layer, cache, pos + pending.shape[1] + i, taps)
                exits.append(h)
        drafts = torch.cat(tokens, 1)[0] if tokens else pending.new_empty(0)
        return ss.Draft(drafts, None, torch.cat(exits, 1), pos, pending.shape[1])
    return draft


def parse_cell(text: str) -> tuple[int, float, float]:
    d, C, tau = text.split(":")
    return int(d), float(C), float(tau)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(p, limit=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cells", default="8:0.6:0,12:0.7:0.3",
                   help="comma-separated d:C:tau cells at the stored exit layer")
    args = p.parse_args()
    try:
        cells = {f"d{d} C{C} tau{t}": (d, C, t) for d, C, t in map(parse_cell, args.cells.split(","))}
    except ValueError:
        p.error(f"--cells: expected d:C:tau items such as 8:0.6:0, got {args.cells!r}")
    model, tokenizer, engine, task, prompts = prepared(args)
    E = model_defaults(model).get("exit_layer")
    if not isinstance(E, int):
        p.error("the model stores no exit layer: nothing to compare with")
    n = args.max_new_tokens
    names = ["autoregressive", "stored", *cells]

    def run(name, ids, stop, **extra):
        cfg = {"max_new_tokens": n}
        if name != "autoregressive":
            cfg["strategy"] = "self_speculative"
        if name in cells:
            d, C, _ = cells[name]
            cfg.update(exit_layer=E, num_speculations=d, confidence_threshold=C)
        ss.draft = product_stop_draft(cells[name][2] if name in cells else 0.0)
        try:
            return layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=stop, **{**cfg, **extra})
        finally:
            ss.draft = _shipped_draft

    stops = [tuple(s.stop_strings) for s in task.samples]
    for name in names:  # warm-up
        run(name, prompts[0], (), max_new_tokens=16)
    seconds = {name: [0.0] * len(prompts) for name in names}
    drafted, accepted, identical = dict.fromkeys(names, 0), dict.fromkeys(names, 0), True
    for rep in range(args.repeats):
        for i, ids in enumerate(prompts):
            shift = (i + rep) % len(names)
            out = {name: run(name, ids, stops[i]) for name in names[shift:] + names[:shift]}
            for name, r in out.items():
                seconds[name][i] += r.stats.total_s
                drafted[name] += r.stats.drafted
                accepted[name] += r.stats.accepted
            identical &= all(r.token_ids == out["autoregressive"].token_ids for r in out.values())
        print(f"repetition {rep + 1}/{args.repeats} done", flush=True)
    report = {}
    for name in names:
        r, lo, hi = ratio_interval(seconds, name, "stored")
        report[name] = {"over_stored": r, "p5": lo, "p95": hi, "drafted": drafted[name],
                        "acceptance": accepted[name] / drafted[name] if drafted[name] else None}
        print(f"{name:20s} / stored {r:.3f} ({lo:.3f}-{hi:.3f})  drafts {drafted[name]}, acceptance "
              f"{report[name]['acceptance'] or 0:.3f}")
    print(f"identical to autoregressive: {identical}")
    if args.json:
        write_json(args.json, {**report_header(args, prompts), "stored": model_defaults(model),
                               "repeats": args.repeats, "cells": report, "identical_to_autoregressive": identical})


if __name__ == "__main__":
    main()
