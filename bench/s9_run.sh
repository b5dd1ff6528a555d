#!/usr/bin/env bash
# Session 9's last call: the out-of-memory fix checked where it failed (a ~16k-token first run at 6 GB,
# warm after; memreport at 6 GB with a 2048-token prompt), then issue 17's 7B step
# (bench/gguf_run.sh s: AWQ and Q4_K_M GGUF load time, decode at 6 / 4 GiB, native and repacked).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b
env_info > $R/env.txt 2>&1
synth_7b $M
A=(--prompt-words 8000 --max-context 20000 --max-new-tokens 4)
timeout 100 python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached --triton-cache fresh \
  --cache-dir /tmp/ls-16k "${A[@]}" --timeout 50 --out $R/startup_16k.json > $R/startup_16k.txt 2>&1; cat $R/startup_16k.txt
LAYERSTREAM_CACHE=/tmp/ls-16k timeout 50 python3 tools/memreport.py --model $M --vram-budget 6GB --prompt-tokens 2048 \
  --context 4096 --out-dir $R/memreport > $R/memreport.txt 2>&1; echo "memreport rc=$?"; grep -A4 "^TIME" $R/memreport.txt
rm -rf $M
mkdir -p $R/gguf && R_DIR=/tmp/results-gguf OUT=$R/gguf BOX=${GGUF_BOX:-330} bash bench/gguf_run.sh s
tar czf $OUT/results.tar.gz -C $R .
