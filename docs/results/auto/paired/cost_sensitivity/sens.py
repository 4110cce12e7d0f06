import os, sys; sys.path.insert(0, os.getcwd())  # run from benchmarks/ (auto_speed, auto_ab)
"""Experiment (not shipped): auto with its measured cost table perturbed, against the stored settings."""
import argparse, dataclasses
import layerskip
from layerskip.decoding import auto
from auto_speed import add_prompt_args, prepared
from auto_ab import ratio_interval
p = argparse.ArgumentParser(); add_prompt_args(p, limit=16); p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()
model, tokenizer, engine, task, prompts = prepared(args)
n = args.max_new_tokens
layerskip.generate(engine, prompts[0], tokenizer=tokenizer, strategy="self_speculative", exit_layer="auto", max_new_tokens=16)
base = dict(engine.step_costs)
key = next(iter(base)); c = base[key]; print("key", key)
print("table", [round(x*1e6) for x in c.layer], round(c.fixed*1e6))
tables = {"auto": c, "fx2": dataclasses.replace(c, fixed=c.fixed * 2), "fx05": dataclasses.replace(c, fixed=c.fixed * 0.5),
          "rows": dataclasses.replace(c, layer=tuple(x * (1 + 0.3 * (i >= 2)) for i, x in enumerate(c.layer)))}
names = ["stored"] + list(tables)
mem = {k: {} for k in tables}
def run(name, ids, stop):
    if name == "stored":
        return layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=stop, strategy="self_speculative", max_new_tokens=n)
    engine.step_costs[key] = tables[name]; engine.auto_memory = mem[name]
    return layerskip.generate(engine, ids, tokenizer=tokenizer, stop_strings=stop, strategy="self_speculative", exit_layer="auto", max_new_tokens=n)
stops = [tuple(s.stop_strings) for s in task.samples]
seconds = {k: [0.0] * len(prompts) for k in names}; tokens = [0] * len(prompts)
for rep in range(args.repeats):
    for m in mem.values(): m.clear()
    for i, ids in enumerate(prompts):
        sh = (i + rep) % len(names)
        for name in names[sh:] + names[:sh]:
            r = run(name, ids, stops[i]); seconds[name][i] += r.stats.total_s
            if name == "stored": tokens[i] += r.stats.num_new_tokens
for k in tables:
    print(k, "/ stored %.3f (%.3f-%.3f)" % ratio_interval(seconds, k, "stored"))
