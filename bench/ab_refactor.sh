#!/usr/bin/env bash
# A/B on one GPU machine: the tree in $1 (an older commit, `git archive` into a carried folder) against
# this tree, on the synthetic Qwen2.5-7B: batch-1 decode at 6 GiB (pinned, then 4.5 GB host: disk tier) and all resident,
# the streaming GPU tests, and two warm engine.run starts of each (\$2 = starts: start-up and tests only; starts-only: no tests). Results land in $OUT/results.tar.gz.
set -uo pipefail
OLD=$(realpath "$1"); NEW=$PWD
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R
M=/tmp/q7b
export PYTHONUNBUFFERED=1
source bench/common.sh  # carried wheels, env_info
env_info 2>&1 | tee $R/env.txt
[ -f $M/config.json ] || (PYTHONPATH=$NEW timeout 90 python3 -m tools.synth --preset qwen2.5-7b --out $M --device cuda 2>&1 | tail -1)
bench() {  # $1 tree, $2 tag
  (cd $1 && PYTHONPATH=$1 timeout 150 python3 -m tools.bench_stream --model $M --budgets 6GiB,full --batches 1 \
    --steps 8 --prefill-tokens 512 --disk-host-budget 4.5GB --out-dir $R --tag $2 > $R/$2.log 2>&1; echo "$2 rc=$?")
  grep -E "GiB|full|disk" $R/$2.log | tail -8; tar czf $OUT/results.tar.gz -C $R .
}
start() {  # $1 tree, $2 tag: two warm starts (Triton and tuning caches warm from the benchmark)
  for k in 1 2; do
    t0=$(date +%s.%N)
    (cd $1 && PYTHONPATH=$1 timeout 100 python3 -m engine.run --model $M --vram-budget 6GB --prompt Hello \
      --max-new-tokens 16 > /dev/null 2>> $R/$2-start.log)
    echo "$2 start $k: $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s rc=$?" | tee -a $R/starts.txt
  done
}
if [[ "${2:-all}" == starts* ]]; then  # start-up only: one start compiles and tunes, then alternate
  start $NEW warmup; start $OLD old; start $NEW new; start $OLD old; start $NEW new; start $OLD old; start $NEW new
else
  bench $NEW new-warmup   # compiles and tunes every kernel once (shared Triton and tuning caches)
  bench $OLD old; bench $NEW new
  start $OLD old; start $NEW new; start $OLD old; start $NEW new
fi
[ "${2:-all}" = starts-only ] || (cd $NEW && LAYERSTREAM_BIG_MODEL=$M timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_stream.py \
  tests/test_pinning.py tests/test_graphs.py tests/test_streamer.py tests/test_allocator_cap.py > $R/pytest_stream.txt 2>&1
  echo "pytest rc=$?"; tail -3 $R/pytest_stream.txt)
tar czf $OUT/results.tar.gz -C $R .
