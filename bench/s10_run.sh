#!/usr/bin/env bash
# The next session's first call (~8 min): session 9's out-of-memory fix checked where it failed, with a
# cold Triton cache (a ~16k-token first and warm run at 6 GB; memreport at 6 GB with a 2048-token prompt,
# its pictures), the process-peak test of the 16k cases at 4 / 6 / 12 GB, and the timeline GPU test alone
# (it aborted in session 9). Results in $OUT/results.tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONFAULTHANDLER=1
source bench/common.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b
env_info > $R/env.txt 2>&1
synth_7b $M
timeout 110 python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached --triton-cache fresh \
  --cache-dir /tmp/ls-16k --prompt-words 8000 --max-context 20000 --max-new-tokens 4 --timeout 50 \
  --out $R/startup_16k.json > $R/startup_16k.txt 2>&1; cat $R/startup_16k.txt
timeout 70 python3 bench/oom_diag.py tools.memreport --model $M --vram-budget 6GB --prompt-tokens 2048 --context 4096 \
  --out-dir $R/memreport > $R/memreport.txt 2>&1; echo "memreport rc=$?"; grep -A4 "^TIME\|^=== live" $R/memreport.txt
LAYERSTREAM_BIG_MODEL=$M timeout 120 python3 -m pytest -q -p no:cacheprovider -k 16k tests/test_gpu_budget.py \
  > $R/pytest_budget16k.txt 2>&1; echo "budget rc=$?"; tail -3 $R/pytest_budget16k.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu_timeline.py > $R/pytest_timeline.txt 2>&1
echo "timeline rc=$?"; tail -5 $R/pytest_timeline.txt
tar czf $OUT/results.tar.gz -C $R .
