#!/usr/bin/env bash
# Issue 14's long-prompt benchmark on one GPU machine: layer-major prefill of 2k-32k tokens at 6 and
# 4 GiB and all resident (tools/bench_prefill.py), with the chunk-major order timed once per budget.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; M=/tmp/q7b
env_info 2>&1 | tee $OUT/env.txt
synth_7b $M
timeout ${1:-420} python3 -m tools.bench_prefill --model $M --budgets 6GiB,4GiB,full --chunk-major \
  --out $OUT/prefill.json 2>&1 | tee $OUT/bench_prefill.log | grep -v "loading weights"
