#!/usr/bin/env bash
# One GPU call: the bf16 decoding benchmark, then the built-in model's two trainings, packed for $OUT.
# Expects runs/default-model from `python scripts/build_default_model.py prepare` (carried).
set -u
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-1200}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python3 benchmarks/synthetic_speed.py --device cuda --dtype bfloat16 --repeats 3 \
  --json $OUT/gpu_bf16_d8.json > /dev/null 2>$OUT/bench.err || tail -5 $OUT/bench.err
timeout ${TRAIN_LIMIT:-330} python3 scripts/build_default_model.py train --steps $STEPS --batch-size 32 \
  --dtype bfloat16 || echo "training stopped (limit or error)"
for r in layerskip baseline; do tail -3 runs/default-model/$r.log; done
python3 - <<'PY'
import glob, os, torch
from safetensors.torch import load_file, save_file
for run in ("layerskip", "baseline"):
    d = f"runs/default-model/{run}"
    src = f"{d}/model.safetensors" if os.path.exists(f"{d}/model.safetensors") else \
        (sorted(glob.glob(f"{d}/checkpoint-*/model.safetensors"), key=lambda p: int(p.split("-")[-1].split("/")[0])) or [None])[-1]
    if src is None:
        print(run, "no weights"); continue
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src).items()}
    save_file(sd, f"/tmp/{run}.safetensors", metadata={"format": "pt", "source": src})
    print(run, "packed from", src)
PY
tar cf /tmp/pack.tar -C /tmp layerskip.safetensors baseline.safetensors \
  -C $PWD/runs/default-model layerskip/training_log.jsonl baseline/training_log.jsonl layerskip.log baseline.log 2>/dev/null
split -b 15M /tmp/pack.tar $OUT/pack.part-
ls -la $OUT
