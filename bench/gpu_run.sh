#!/usr/bin/env bash
# One device-machine session: benchmarks first, then GPU correctness, each step time-boxed.
# Results go to $OUT. Run from the repo root on the GPU machine: bash bench/gpu_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/q7b
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  date -u; } 2>&1 | tee "$OUT/env.txt"
[ -f $M/config.json ] || timeout 90 python3 -m tools.synth --preset qwen2.5-7b --out $M --device cuda 2>&1 | tail -2
# 1. streaming benchmark: 6 GiB and all-resident at batch 1, accelerate offload at 6 GiB as the peer
timeout 260 python3 -m tools.bench_stream --model $M --budgets 6GiB,full --batches 1 --steps 10 --accelerate \
  --out-dir "$OUT" > "$OUT/bench_stream.log" 2>&1; echo "bench_stream rc=$?"; tail -14 "$OUT/bench_stream.log"
# 2. the CLI on the 7B at 6 GiB, JSON
timeout 60 python3 -m engine.run --model $M --prompt "Tell me about layer streaming." --vram-budget 6GiB \
  --max-new-tokens 16 --json > "$OUT/run_7b_6gib.json" 2> "$OUT/run_7b_6gib.err"; echo "run rc=$?"
python3 -c "import json; d=json.load(open('$OUT/run_7b_6gib.json')); print(d['token_ids'], {k: round(v, 3) for k, v in d['stats'].items()})"
# 3. memreport at 6 GB (pictures for the README)
timeout 60 python3 tools/memreport.py --model $M --vram-budget 6GB --out-dir "$OUT/memreport" > "$OUT/memreport.txt" 2>&1
echo "memreport rc=$?"; tail -5 "$OUT/memreport.txt"
# 4. GPU tests: kernels at real shapes, streaming within a hard allocator cap
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_stream.py tests/test_kernels_elementwise.py \
  tests/test_kernels_matmul_attention.py > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest rc=$?"; tail -4 "$OUT/pytest_gpu.txt"
