#!/usr/bin/env bash
# A/B on one machine: the 7B AWQ 16-prompt burst in process (bench/burst_probe.py) with this tree's kernels
# ("new") and with the kernel files in $AB_OLD (default .ab_old, git-ignored: carry it) put over a copy of
# it ("old"), alternated, to tell a slower machine from a slower engine. Session 25 made .ab_old with
# `git show 07eddb8^:kernels/$f.py` for gemm, linear and qlinear (the tiles' GEMM outputs copied into place)
# and ran it on 07eddb8 (each tile's GEMM writing its columns in place).
set -uo pipefail
export PYTHONUNBUFFERED=1
source bench/common.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; env_info > $OUT/env.txt 2>&1
[ -f /tmp/q7b-awq/config.json ] || python3 -m tools.synth --preset qwen2.5-7b --out /tmp/q7b-awq --quant awq --device cuda 2>&1 | tail -1
rm -rf /tmp/old && mkdir /tmp/old && cp -r engine kernels memory streamer tools bench /tmp/old/ && cp ${AB_OLD:-.ab_old}/*.py /tmp/old/kernels/
n=0; for i in ${AB_ORDER:-new old new old}; do n=$((n+1))
  d=$PWD; [ $i = old ] && d=/tmp/old
  (cd $d && PYTHONPATH=$d timeout ${AB_T:-150} python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 \
    --out $OUT/burst_$n$i.json) > $OUT/burst_$n$i.txt 2>&1; echo "== $i rc=$?"; grep -E "warm-up|round" $OUT/burst_$n$i.txt
done
