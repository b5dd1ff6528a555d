#!/usr/bin/env bash
# One device-machine session: benchmarks first, then GPU correctness, each step time-boxed.
# A call runs the steps named in $1 (default "123456", more than one 10-minute call, so split it,
# e.g. `bash bench/gpu_run.sh 124`, then `5`, then `3`, then `6`; the GPU tests are steps 3 and 6;
# 7: all resident only, 8: start-up of three processes, 9: cProfile of a warm start). Everything lands in $OUT/results.tar.gz (the device tool returns at most 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R  # a reused machine may hold older files
M=/tmp/q7b
steps=${1:-123456}
env_info 2>&1 | tee $R/env.txt
synth_7b $M
if [[ $steps == *1* ]]; then  # streaming at batch 1: budget sweep, disk tier, accelerate offload as the peer
  timeout 240 python3 -m tools.bench_stream --model $M --budgets 6GiB,4GiB,10GiB,full --batches 1 --steps 8 \
    --accelerate --disk-host-budget 4.5GB --out-dir $R --tag stream-b1 > $R/bench_stream_b1.log 2>&1
  echo "b1 rc=$?"; tail -16 $R/bench_stream_b1.log
fi
if [[ $steps == *2* ]]; then  # batch 16 at 6 GiB against all-resident batch 16 (1k context)
  timeout 90 python3 -m tools.bench_stream --model $M --budgets 6GiB,full --batches 16 --steps 8 \
    --prefill-tokens 0 --out-dir $R --tag stream-b16 > $R/bench_stream_b16.log 2>&1
  echo "b16 rc=$?"; tail -6 $R/bench_stream_b16.log
fi
if [[ $steps == *3* ]]; then  # GPU tests, part 1: allocator cap at the budget, triton vs torch on the 7B, matmuls
  LAYERSTREAM_BIG_MODEL=$M timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_stream.py \
    tests/test_gpu_e2e.py tests/test_kernels_gemm.py tests/test_kernels_matmul_attention.py > $R/pytest_gpu.txt 2>&1
  echo "pytest rc=$?"; tail -6 $R/pytest_gpu.txt
fi
if [[ $steps == *6* ]]; then  # GPU tests, part 2 (a fresh machine compiles everything: two parts fit 10-minute calls)
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention_decode.py tests/test_kernels_rope.py \
    tests/test_kernels_elementwise.py tests/test_kernels_sampling.py tests/test_kernels_tuning.py \
    tests/test_kernels_tuning_cache.py tests/test_kernels_untuned.py tests/test_allocator_cap.py tests/test_pinning.py > $R/pytest_gpu2.txt 2>&1
  echo "pytest2 rc=$?"; tail -6 $R/pytest_gpu2.txt
fi
if [[ $steps == *4* ]]; then  # memreport at 6 GB with its pictures
  timeout 60 python3 tools/memreport.py --model $M --vram-budget 6GB --out-dir $R/memreport > $R/memreport.txt 2>&1
  echo "memreport rc=$?"; grep -A3 "^TIME" $R/memreport.txt
fi
if [[ $steps == *5* ]]; then  # kernels against torch and the ceilings measured in the same run
  timeout 420 python3 -m tools.bench_kernels --out $R/kernels.json > $R/kernels.txt 2>&1
  echo "kernels rc=$?"; tail -30 $R/kernels.txt
fi
if [[ $steps == *7* ]]; then  # all resident only: decode through one graph, 2048-token prefill
  timeout 120 python3 -m tools.bench_stream --model $M --budgets full --batches 1 --steps 16 \
    --out-dir $R --tag stream-full > $R/bench_stream_full.log 2>&1
  echo "full rc=$?"; tail -4 $R/bench_stream_full.log
fi
if [[ $steps == *8* ]]; then  # start-up of three CLI processes: empty tuning cache, cached, cache off
  timeout 420 python3 -m tools.bench_startup --model $M --vram-budget 6GB --out $R/startup.json \
    > $R/startup.txt 2>&1
  echo "startup rc=$?"; tail -5 $R/startup.txt
fi
if [[ $steps == *9* ]]; then  # where a warm start's time goes: a warm-up process, then one under cProfile
  C="python3 -m engine.run --model $M --vram-budget 6GB --prompt hi --max-new-tokens 4"
  LAYERSTREAM_CACHE=/tmp/lscache timeout 200 $C > /dev/null 2>&1; echo "warm-up rc=$?"
  python3 -c "import time; t = time.perf_counter(); import torch, triton; print(f'import torch+triton {time.perf_counter() - t:.2f} s')" \
    > $R/startup_profile.txt 2>&1
  t0=$(date +%s.%N)
  LAYERSTREAM_CACHE=/tmp/lscache timeout 200 python3 -m cProfile -o $R/startup.prof -m engine.run --model $M \
    --vram-budget 6GB --prompt hi --max-new-tokens 4 -v > $R/startup_run.txt 2>&1; echo "profiled rc=$?"
  echo "profiled process wall $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s" >> $R/startup_profile.txt
  python3 -c "import pstats; pstats.Stats('$R/startup.prof').sort_stats('cumulative').print_stats(60)" \
    >> $R/startup_profile.txt 2>&1
  head -3 $R/startup_profile.txt; grep -m 25 -E "engine|streamer|memory|kernels" $R/startup_profile.txt
fi
# the tuning picks this session's runs made: `python -m tools.export_tuning results/tuning/*.json` ships them
mkdir -p $R/tuning && cp "${LAYERSTREAM_CACHE:-$HOME/.cache/layerstream}"/tuning/*.json $R/tuning/ 2>/dev/null
tar czf $OUT/results.tar.gz -C $R .
