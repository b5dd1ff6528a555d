#!/usr/bin/env bash
# One device-machine session: correctness on the GPU, then the benchmarks. Results go to $OUT.
# Usage (from the repo root on the GPU machine): bash bench/gpu_run.sh [tests|stream|kernels|all]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/q7b
what=${1:-all}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"
if [ ! -f $M/config.json ]; then
  t=$(date +%s); python3 -m tools.synth --preset qwen2.5-7b --out $M --device cuda 2>&1 | tail -3
  echo "synth took $(( $(date +%s) - t )) s"; du -sh $M
fi
case $what in tests|all)
  timeout 300 python3 -m pytest -q -x --timeout 120 -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25 ;;
esac
case $what in stream|all)
  python3 -m engine.run --model $M --prompt "Tell me about layer streaming." --vram-budget 6GiB --max-new-tokens 16 --json > "$OUT/run_7b_6gib.json" 2> "$OUT/run_7b_6gib.err"; tail -3 "$OUT/run_7b_6gib.err"
  python3 -c "import json; d=json.load(open('$OUT/run_7b_6gib.json')); print('tokens', d['token_ids'], d['stats'])"
  python3 -m tools.bench_stream --model $M --budgets 6GiB,full --batches 1 --accelerate --out-dir "$OUT" 2>&1 | tail -12 ;;
esac
case $what in kernels|all)
  timeout 400 python3 -m tools.bench_kernels --out "$OUT/kernels.json" 2>&1 | tail -40 ;;
esac
