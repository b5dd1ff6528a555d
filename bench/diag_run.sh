#!/usr/bin/env bash
# Out-of-memory diagnosis on the GPU machine (bench/oom_diag.py), plus GPU tests named in $TESTS.
# The synthetic Qwen2.5-7B at 6 GB: memreport with a 2048-token prompt (context 4096) and engine.run
# with a ~16k-token prompt (context 20000), each with an empty tuning cache; results in $OUT/results.tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b
env_info > $R/env.txt 2>&1
synth_7b $M
P="$(python3 -c 'print(" ".join(["hello"] * 8000))')"
LAYERSTREAM_CACHE=/tmp/ls-d1 timeout 90 python3 bench/oom_diag.py tools.memreport --model $M --vram-budget 6GB \
  --prompt-tokens 2048 --context 4096 --out-dir $R/memreport -v > $R/diag_memreport.txt 2>&1
echo "memreport rc=$?"; grep -v "^  File\|^    " $R/diag_memreport.txt | tail -40
LAYERSTREAM_CACHE=/tmp/ls-d2 timeout 90 python3 bench/oom_diag.py engine.run --model $M --vram-budget 6GB --no-chat \
  --prompt "$P" --max-new-tokens 4 --max-context 20000 --json --show-plan -v > $R/diag_16k.txt 2>&1
echo "16k rc=$?"; grep -v "^  File\|^    " $R/diag_16k.txt | tail -40
[ -n "${TESTS:-}" ] && timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider -m cuda $TESTS > $R/pytest.txt 2>&1
echo "pytest rc=$?"; tail -5 $R/pytest.txt
tar czf $OUT/results.tar.gz -C $R .
