#!/usr/bin/env bash
# Issues 15 and 17 on one GPU machine, steps in $1 (each time-boxed; one call holds "s" or one 72B step):
#  s  7B: the synthetic Qwen2.5-7B AWQ and Q4_K_M GGUF (random blocks, written on the GPU): load time of
#     each (a short engine.run, whole process) and decode at 6 GiB, batch 1 (bench_stream); the GGUF's
#     layers as their own blocks (default) and repacked (LAYERSTREAM_GGUF_NATIVE=0), at 6 and 4 GiB
#  k  the native GGUF kernels: CUDA tests (tests/test_kernels_ggml.py, tests/test_gguf_native.py),
#     bench/probe_qkernels.py --ggml (ggml_gemv on Q4_K / Q6_K blocks at the 7B shapes against a copy)
#     and --ggml-sweep (its launch configs; SWEEP_S seconds)
#  a  72B AWQ (synthetic, ~42 GB) at --vram-budget 24GB: step against its bound, tok/s, peak VRAM, host RSS
#  g  72B Q4_K_M GGUF (synthetic, ~47 GB) at 24GB, the same (the 72B AWQ is deleted first: 64 GiB of disk)
# Results in $OUT/results.tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; R=${R_DIR:-/tmp/results}; rm -rf $R; mkdir -p "$OUT" $R
steps=${1:-s}; END=$(( $(date +%s) + ${BOX:-540} ))
left() { local l=$(( END - $(date +%s) )); (( l > $1 )) && echo $1 || echo $(( l > 5 ? l : 5 )); }
RSS=(); [ -x /usr/bin/time ] && RSS=(/usr/bin/time -f "max RSS %M KB, wall %e s")  # timeout runs programs, not functions
env_info > $R/env.txt 2>&1
synth() { [ -e $2 ] || timeout $(left 240) python3 -m tools.synth --preset $1 --out $2 --device cuda "${@:3}" 2>&1 | tail -1; }
bench() { timeout $(left $3) "${RSS[@]}" python3 -m tools.bench_stream --model $1 --budgets $2 --batches 1 --steps 6 \
  --prefill-tokens 0 --out-dir $R --tag $4 > $R/bench_$4.log 2>&1; echo "$4 rc=$?"; tail -3 $R/bench_$4.log; }
if [[ $steps == *s* ]]; then  # most wanted first: the native GGUF's decode, then AWQ's, load times, repacked
  synth qwen2.5-7b /tmp/q7b-gguf --format gguf --gguf-type Q4_K_M
  G=$(ls /tmp/q7b-gguf/*.gguf | head -1); du -sh $G | tee -a $R/env.txt
  bench $G 6GiB,4GiB 120 gguf7b
  synth qwen2.5-7b /tmp/q7b-awq --quant awq; du -sh /tmp/q7b-awq | tee -a $R/env.txt
  bench /tmp/q7b-awq 6GiB 90 awq7b
  for m in /tmp/q7b-awq $G; do  # load time: whole process, warm page cache (second of two runs)
    for i in 1 2; do s=$(date +%s.%N)
      timeout $(left 90) python3 -m engine.run --model $m --vram-budget 6GiB --prompt Hello --max-new-tokens 8 --json \
        > $R/load_$(basename $m)_$i.json 2> $R/load_$(basename $m)_$i.err
      echo "$(basename $m) run $i rc=$? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s" | tee -a $R/load.txt
    done
  done
  LAYERSTREAM_GGUF_NATIVE=0 bench $G 6GiB,4GiB 120 gguf7b-repacked
save; fi
if [[ $steps == *k* ]]; then
  timeout $(left 150) python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels_ggml.py tests/test_gguf_native.py \
    tests/test_kernels_ggml_config.py > $R/pytest_ggml.txt 2>&1; echo "pytest rc=$?"; tail -8 $R/pytest_ggml.txt
  timeout $(left 150) python3 bench/probe_qkernels.py --batches 1,4,16 --out $R/probe_ggml.json > $R/probe_ggml.txt 2>&1
  echo "probe rc=$?"; tail -30 $R/probe_ggml.txt
  timeout $(left 260) python3 bench/probe_qkernels.py --ggml-sweep --budget-s ${SWEEP_S:-220} --out $R/sweep_ggml.json \
    > $R/sweep_ggml.txt 2>&1; echo "sweep rc=$?"; tail -40 $R/sweep_ggml.txt
save; fi
[[ $steps == *[ag]* ]] && rm -rf /tmp/q7b /tmp/q7b-awq /tmp/q7b-gguf /tmp/ls-*  # a 72B needs the 64 GiB disk
if [[ $steps == *a* ]]; then
  synth qwen2.5-72b /tmp/q72-awq --quant awq; du -sh /tmp/q72-awq | tee -a $R/env.txt
  bench /tmp/q72-awq 24GB 300 awq72b
save; fi
if [[ $steps == *g* ]]; then
  rm -rf /tmp/q72-awq
  synth qwen2.5-72b /tmp/q72-gguf --format gguf --gguf-type Q4_K_M; du -sh /tmp/q72-gguf | tee -a $R/env.txt
  bench "$(ls /tmp/q72-gguf/*.gguf | head -1)" 24GB 300 gguf72b
save; fi
save
