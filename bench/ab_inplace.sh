#!/usr/bin/env bash
# A/B on one machine: the 7B AWQ 16-prompt burst in process (bench/burst_probe.py) with this tree ("new")
# and with the tree overlay in $AB_OLD (default .ab_old, git-ignored: carry it) put over a copy of this one
# ("old"), alternated ($AB_ORDER), to tell a slower machine from a slower engine (burst passes are host-bound
# and a machine's host speed varies by ~20%). Session 25 compared in-place tile GEMMs (new) with copies
# (old: the kernel files of 07eddb8^); session 27 made .ab_old with
# `git archive ba97b43^ kernels memory engine | tar -x -C .ab_old` (copies, 100 MiB tile) against ba97b43+.
# AB_ENV_new / AB_ENV_old: variables for that side's runs, e.g. AB_ENV_new=LAYERSTREAM_DEQUANT_SCRATCH=100MiB
# (the in-place GEMMs at the old side's tile size: one change at a time).
set -uo pipefail
export PYTHONUNBUFFERED=1
source bench/common.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; env_info > $OUT/env.txt 2>&1
[ -f /tmp/q7b-awq/config.json ] || python3 -m tools.synth --preset qwen2.5-7b --out /tmp/q7b-awq --quant awq --device cuda 2>&1 | tail -1
rm -rf /tmp/old && mkdir /tmp/old && cp -r engine kernels memory streamer tools bench /tmp/old/ && cp -r ${AB_OLD:-.ab_old}/. /tmp/old/
n=0; for i in ${AB_ORDER:-new old new old}; do n=$((n+1))
  d=$PWD; [ $i = old ] && d=/tmp/old
  e=AB_ENV_$i; (cd $d && env ${!e:-} PYTHONPATH=$d timeout ${AB_T:-150} python3 bench/burst_probe.py --model /tmp/q7b-awq --rounds 2 \
    --out $OUT/burst_$n$i.json) > $OUT/burst_$n$i.txt 2>&1; echo "== $i rc=$?"; grep -E "plan:|warm-up|round" $OUT/burst_$n$i.txt | cut -c1-150
done
