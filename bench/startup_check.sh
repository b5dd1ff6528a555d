#!/usr/bin/env bash
# Start-up on a fresh machine (cold Triton cache): bench_startup, then one prompt in a new row bucket,
# then the tuning tests and the 7B end-to-end test (every tuner runs there).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b
env_info > $R/env.txt 2>&1
synth_7b $M
timeout 300 python3 -m tools.bench_startup --model $M --vram-budget 6GB --cache-dir /tmp/lscache \
  --out $R/startup.json > $R/startup.txt 2>&1; echo "startup rc=$?"; cat $R/startup.txt
P=$(python3 -c "print('the quick brown fox jumps ' * 8)")
t0=$(date +%s.%N)
LAYERSTREAM_CACHE=/tmp/lscache timeout 120 python3 -m engine.run --model $M --vram-budget 6GB --prompt "$P" \
  --max-new-tokens 8 --json > $R/new_bucket.json 2> $R/new_bucket.err; echo "new bucket rc=$?"
python3 -c "import json,sys; d=json.load(open('$R/new_bucket.json')); s=d['stats']; print('new bucket: prompt', s['prompt_tokens'], 'tokens, prefill', round(s['prefill_s'],2), 's, wall', round($(date +%s.%N)-$t0,1), 's')" | tee -a $R/startup.txt
LAYERSTREAM_BIG_MODEL=$M timeout ${TEST_BOX:-200} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_tuning.py \
  tests/test_kernels_untuned.py tests/test_kernels_tuning_cache.py tests/test_gpu_e2e.py > $R/pytest_tuning_e2e.txt 2>&1
echo "pytest rc=$?"; tail -2 $R/pytest_tuning_e2e.txt
tar czf $OUT/results.tar.gz -C $R .
