#!/usr/bin/env bash
# Issue 14 part 2 and issue 18's benchmark on one fresh GPU machine (one call):
#  1. the first runs a user meets, with nothing shipped (short prompt, ~16k-token prompt at 6 GB): their wall
#     time is "before", and they fill an empty tuning cache;
#  2. the host-lane benchmark (bench_stream --host-compute off,auto at 6 / 4 GiB, batch 1 and 4), which also
#     tunes those decode shapes;
#  3. tools.export_tuning turns the cache into kernels/tuned/<gpu>.json (it comes back in the results);
#  4. "after": bench_startup with those shipped picks, an empty tuning cache and an empty Triton cache (first)
#     against the warm run (cached), short and ~16k-token prompts;
#  5. where a warm start's time goes (import time, cProfile).
# Everything lands in $OUT/results.tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
env_info 2>&1 | tee $R/env.txt
synth_7b $M
LONG=$(python3 -c "print(' '.join(['hello'] * 8000))")
export LAYERSTREAM_CACHE=/tmp/tune-cache TRITON_CACHE_DIR=/tmp/triton-tune; rm -rf $LAYERSTREAM_CACHE $TRITON_CACHE_DIR
ls kernels/tuned/ > $R/shipped_before.txt 2>&1
for c in short long; do  # before: nothing shipped, empty caches (the first is a fresh machine's first run)
  if [ $c = short ]; then A=(--prompt Hello --max-new-tokens 16); else A=(--no-chat --prompt "$LONG" --max-new-tokens 4 --max-context 20000); fi
  s=$(date +%s.%N)
  timeout 150 python3 -m engine.run --model $M --vram-budget 6GB "${A[@]}" --json > $R/before_$c.json 2> $R/before_$c.err
  echo "before $c rc=$? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s" | tee -a $R/before.txt
done
el "host lane"
timeout 200 python3 -m tools.bench_stream --model $M --budgets 6GiB,4GiB --batches 1,4 --steps 8 --prefill-tokens 0 \
  --host-compute off,auto --out-dir $R --tag hostlane > $R/bench_hostlane.log 2>&1
echo "hostlane rc=$?"; tail -12 $R/bench_hostlane.log
el "export"
python3 -m tools.export_tuning $LAYERSTREAM_CACHE/tuning/*.json 2>&1 | tee $R/export.txt
cp kernels/tuned/*.json $R/ 2>/dev/null
unset TRITON_CACHE_DIR
el "after: short"
timeout 150 python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached --triton-cache fresh \
  --cache-dir /tmp/ls-short --timeout 70 --out $R/startup_short.json > $R/startup_short.txt 2>&1; cat $R/startup_short.txt
el "after: 16k"
timeout 170 python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached --triton-cache fresh \
  --cache-dir /tmp/ls-long --prompt-words 8000 --max-context 20000 --max-new-tokens 4 --timeout 80 \
  --out $R/startup_16k.json > $R/startup_16k.txt 2>&1; cat $R/startup_16k.txt
el "warm-start profile"
python3 -c "import time; t = time.perf_counter(); import torch, triton; print(f'import torch+triton {time.perf_counter() - t:.2f} s')" \
  > $R/startup_profile.txt 2>&1
export LAYERSTREAM_CACHE=/tmp/ls-short
s=$(date +%s.%N)
timeout 60 python3 -m cProfile -o $R/startup.prof -m engine.run --model $M --vram-budget 6GB --prompt Hello \
  --max-new-tokens 16 -v > $R/startup_run.txt 2>&1; echo "profiled rc=$?"
echo "profiled process wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s" >> $R/startup_profile.txt
python3 -c "import pstats; pstats.Stats('$R/startup.prof').sort_stats('cumulative').print_stats(70)" >> $R/startup_profile.txt 2>&1
head -3 $R/startup_profile.txt
el "done"
tar czf $OUT/results.tar.gz -C $R .
