#!/usr/bin/env bash
# Issue 14's long-prompt benchmark on one GPU machine: layer-major prefill of 2k-32k tokens at 6 and
# 4 GiB and all resident (tools/bench_prefill.py), with the chunk-major order timed once per budget.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; M=/tmp/q7b
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } 2>&1 | tee $OUT/env.txt
[ -f $M/config.json ] || timeout 90 python3 -m tools.synth --preset qwen2.5-7b --out $M --device cuda 2>&1 | tail -1
timeout ${1:-420} python3 -m tools.bench_prefill --model $M --budgets 6GiB,4GiB,full --chunk-major \
  --out $OUT/prefill.json 2>&1 | tee $OUT/bench_prefill.log | grep -v "loading weights"
