#!/usr/bin/env bash
# Issue 14 part 3 on one GPU machine: engine.run's process peak (NVML, sampled from outside) against
# --vram-budget at 4 / 6 / 12 GB for a short prompt, a ~16k-token prompt and batch 8.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; M=/tmp/q7b
env_info 2>&1 | tee $OUT/env.txt
synth_7b $M
LAYERSTREAM_BIG_MODEL=$M LAYERSTREAM_BUDGET_LOG=$OUT/budget.jsonl timeout ${1:-450} python3 -m pytest -q \
  -p no:cacheprovider tests/test_gpu_budget.py 2>&1 | tee $OUT/pytest_budget.txt | tail -15
cat $OUT/budget.jsonl
