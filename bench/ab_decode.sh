#!/usr/bin/env bash
# Programmatic dependent launch (kernels/pdl.py, on by default since session 33: arm old = LAYERSTREAM_PDL=0; arm
# pdl = LAYERSTREAM_PDL=1), batch-1 decode on one machine (issue 15: the synthetic 7B AWQ at 6 GiB against the
# all-resident bf16 7B, target 1.5x; session 23: 1.385x, 2.9 ms a step of which 2.60 ms kernels in ~267 launches).
#   1. bench/probe_pdl.py: a chain of the step's shape in one CUDA graph, plain / PDL;
#      tools.bench_host_int4 per activation dtype (issue 18's int4 host layers), bench/probe_host_layer.py;
#   2. the PDL kernels' GPU tests under LAYERSTREAM_PDL=1 (eager launches), and the AWQ's greedy text with and
#      without PDL (tools.bench_stream does not check tokens);
#   3. tools.bench_stream in the order $AB_ORDER (default "old pdl pdl old"), AWQ at 6 GiB then bf16 all resident;
#   4. tools.profile_decode of the AWQ at 6 GiB in each arm (kernel time against step time: the gaps);
#   5. bench/probe_qkernels.py at batch 1 and 4: every candidate of the int4 GEMV timed, the best of each variant;
#   6. bench/probe_ladder.py (what the int8-x GEMV adds to reading its weights, piece by piece) and
#      bench/probe_access.py (reading them alone, every tile kept in access.json).
# Arms notrans / trans: LAYERSTREAM_I8_TRANS=0 / 1 (kernels/qgemv_i8.py's tile axes; AB_ARMS="notrans trans" for step 2).
# AB_STEPS picks among 1-6 (default 123; calls of the device tool: AB_STEPS=12, 3, 4, 5, 6).
# Results in $OUT (tar it: the device tool returns ~8 files); each arm's tok/s and the AWQ / bf16 ratio.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; env_info > $OUT/env.txt 2>&1
steps=${AB_STEPS:-123}
# arm tune: the shipped picks ignored, every kernel timed in the first such run and cached for the later ones
# (export them with `python -m tools.export_tuning <results>/tuning/*.json` where they win)
arm_env() { case $1 in old) echo LAYERSTREAM_PDL=0;; pdl) echo LAYERSTREAM_PDL=1;;
  tune) echo LAYERSTREAM_SHIPPED_TUNING=0 LAYERSTREAM_CACHE=/tmp/ab_tune;;
  notrans) echo LAYERSTREAM_I8_TRANS=0;; trans) echo LAYERSTREAM_I8_TRANS=1;; esac; }  # the int8-x GEMV's tile axes
read -r ARM_A ARM_B <<< "${AB_ARMS:-old pdl}"  # step 2's two arms (greedy text compared)
if [[ $steps == *1* ]]; then
timeout 90 python3 bench/probe_pdl.py > $OUT/probe_pdl.txt 2>&1; echo "probe rc=$?"; cat $OUT/probe_pdl.txt | tail -8
# issue 18: torch's CPU int4 kernel read 0.9 GB/s on this host (session 11) against 7.5 GB/s on a 2-vCPU AVX2 CI
# machine (bench/results/2026-12-04-cpu-host-lane): its rate per activation dtype, with env.txt's cpu flags
for dt in bfloat16 float32 float16; do timeout 40 python3 -m tools.bench_host_int4 --shapes 4608x3584 --batches 1,4 \
  --dtype $dt --repeats 3 2>&1 | tail -3; done > $OUT/host_int4.txt; grep -i "int4\|GB/s" $OUT/host_int4.txt | head -8
for c in 1024 4096; do timeout 60 python3 bench/probe_host_layer.py --context $c 2>&1 | tail -5; done > $OUT/host_layer.txt
cat $OUT/host_layer.txt  # a 7B host layer's time against its projections (the fp32 host attention)
fi
[[ $steps == *[234]* ]] && { [ -f /tmp/q7b-awq/config.json ] || timeout 90 python3 -m tools.synth --preset qwen2.5-7b \
  --out /tmp/q7b-awq --quant awq --device cuda 2>&1 | tail -1; }
if [[ $steps == *2* ]]; then
LAYERSTREAM_PDL=1 timeout ${AB_TEST_S:-180} python3 -m pytest -q -x -p no:cacheprovider -m cuda \
  tests/test_kernels_qgemv_i8.py tests/test_kernels_rope_kv_append.py tests/test_kernels_attention_decode.py \
  tests/test_kernels_quant.py -k "gemv or rope or attention or i8" \
  > $OUT/pytest_pdl.txt 2>&1; echo "pytest rc=$?"; tail -2 $OUT/pytest_pdl.txt
for arm in $ARM_A $ARM_B; do
  env $(arm_env $arm) timeout 120 python3 -m engine.run --model /tmp/q7b-awq \
    --vram-budget 6GiB --prompt "The quick brown fox" --max-new-tokens 48 --temperature 0 > $OUT/text_$arm.txt 2> $OUT/run_$arm.log
done
cmp -s $OUT/text_$ARM_A.txt $OUT/text_$ARM_B.txt && echo "greedy text: same" || {
  echo "greedy text DIFFERS"; diff $OUT/text_$ARM_A.txt $OUT/text_$ARM_B.txt | head; }
fi
if [[ $steps == *3* ]]; then
synth_7b /tmp/q7b
n=0; for arm in ${AB_ORDER:-old pdl pdl old}; do n=$((n+1)); P=$(arm_env $arm)
  env $P timeout 120 python3 -m tools.bench_stream --model /tmp/q7b-awq --budgets 6GiB --batches 1 --steps 8 \
    --prefill-tokens 0 --out-dir $OUT --tag awq_$n$arm > $OUT/bench_awq_$n$arm.log 2>&1
  env $P timeout 120 python3 -m tools.bench_stream --model /tmp/q7b --budgets full --batches 1 --steps 8 \
    --prefill-tokens 0 --out-dir $OUT --tag bf16_$n$arm > $OUT/bench_bf16_$n$arm.log 2>&1
  a=$(grep -oE "[0-9.]+ tok/s" $OUT/bench_awq_$n$arm.log | tail -1 | cut -d' ' -f1)
  b=$(grep -oE "[0-9.]+ tok/s" $OUT/bench_bf16_$n$arm.log | tail -1 | cut -d' ' -f1)
  echo "== $n $arm: awq ${a:-?} tok/s, bf16 all resident ${b:-?} tok/s, ratio $(python3 -c "print(round(${a:-0}/${b:-1}, 3))")"
done
fi
if [[ $steps == *4* ]]; then
for arm in old pdl; do
  env $(arm_env $arm) timeout 90 python3 -m tools.profile_decode --model /tmp/q7b-awq \
    --vram-budget 6GiB --steps 8 --json $OUT/profile_$arm.json > $OUT/profile_$arm.txt 2>&1
  echo "profile $arm rc=$?"; grep -v Warning $OUT/profile_$arm.txt | head -3
done
fi
if [[ $steps == *5* ]]; then  # one batch a run: a run cut by its timeout prints nothing
for m in 1 4; do
  timeout 200 python3 bench/probe_qkernels.py --batches $m --ggml '' --out $OUT/probe_qkernels_m$m.json \
    > $OUT/probe_qkernels_m$m.txt 2>&1; echo "probe M=$m rc=$?"; grep -E "i8x|3d|split|wrong" $OUT/probe_qkernels_m$m.txt | head -16
done
fi
if [[ $steps == *6* ]]; then
timeout 300 python3 bench/probe_ladder.py --out $OUT/ladder.json > $OUT/ladder.txt 2>&1; echo "ladder rc=$?"
grep best $OUT/ladder.txt
timeout 150 python3 bench/probe_access.py --out $OUT/access.json > $OUT/access.txt 2>&1; echo "access rc=$?"
fi
if [ -d /tmp/ab_tune/tuning ]; then mkdir -p $OUT/tuning && cp /tmp/ab_tune/tuning/*.json $OUT/tuning/; fi
