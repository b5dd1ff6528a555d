#!/usr/bin/env bash
# One fresh GPU machine, one call (results in $OUT/results.tar.gz), steps in $1 (default "pqfhtk"),
# each time-boxed so the whole call ends inside the device tool's 10 minutes:
#  p  issue 15: bench/probe_qkernels.py, every quantized-matmul variant at Qwen2.5-7B int4 shapes
#  q  issue 15: the synthetic Qwen2.5-7B AWQ at 6 GiB against the all-resident bf16 7B, batch 1
#  f  issue 14: a fresh machine's first run against the warm one, ~16k-token and short prompts at 6 GB
#  h  issue 18: the host lane at 6 GiB, batch 1, its host rate now measured next to H2D copies
#  t  the host-lane GPU tests, stopping at the first failure (its traceback)
#  k  issue 15: --quantize int8 at 4 GiB on the bf16 7B
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh  # carried wheels, env_info, synth_7b
OUT=${OUT:-/tmp/out}; R=/tmp/results; rm -rf $R; mkdir -p "$OUT" $R; M=/tmp/q7b; A=/tmp/q7b-awq
steps=${1:-pqfhtk}; END=$(( $(date +%s) + ${BOX:-540} ))
left() { local l=$(( END - $(date +%s) )); (( l > $1 )) && echo $1 || echo $(( l > 5 ? l : 5 )); }
env_info > $R/env.txt 2>&1
synth_7b $M
if [[ $steps == *p* ]]; then
  timeout $(left 210) python3 bench/probe_qkernels.py --out $R/probe_qkernels.json > $R/probe_qkernels.txt 2>&1
  echo "probe rc=$?"; tail -30 $R/probe_qkernels.txt
fi
if [[ $steps == *q* ]]; then
  [ -f $A/config.json ] || timeout 90 python3 -m tools.synth --preset qwen2.5-7b --quant awq --out $A --device cuda 2>&1 | tail -1
  timeout $(left 100) python3 -m tools.bench_stream --model $A --budgets 6GiB --batches 1 --steps 8 --prefill-tokens 0 \
    --out-dir $R --tag awq > $R/bench_awq.log 2>&1; echo "awq rc=$?"; tail -4 $R/bench_awq.log
  timeout $(left 60) python3 -m tools.bench_stream --model $M --budgets full --batches 1 --steps 8 --prefill-tokens 0 \
    --out-dir $R --tag bf16-full > $R/bench_bf16_full.log 2>&1; echo "full rc=$?"; tail -3 $R/bench_bf16_full.log
fi
if [[ $steps == *f* ]]; then
  for p in 16k short; do
    X=(); [ $p = 16k ] && X=(--prompt-words 8000 --max-context 20000 --max-new-tokens 4)
    timeout $(left 90) python3 -m tools.bench_startup --model $M --vram-budget 6GB --runs first,cached \
      --triton-cache fresh --cache-dir /tmp/ls-$p "${X[@]}" --timeout 45 --out $R/startup_$p.json > $R/startup_$p.txt 2>&1
    cat $R/startup_$p.txt
  done
fi
if [[ $steps == *h* ]]; then
  timeout $(left 80) python3 -m tools.bench_stream --model $M --budgets 6GiB --batches 1 --steps 8 --prefill-tokens 0 \
    --host-compute off,auto --out-dir $R --tag hostlane > $R/bench_hostlane.log 2>&1
  echo "hostlane rc=$?"; tail -4 $R/bench_hostlane.log
fi
if [[ $steps == *t* ]]; then
  timeout $(left 60) python3 -m pytest -x -q -p no:cacheprovider -m cuda tests/test_host_lane.py tests/test_host_rate.py \
    > $R/pytest_hostlane.txt 2>&1; echo "pytest rc=$?"; grep -E "Error|error|assert|passed|failed" $R/pytest_hostlane.txt | head -12
fi
if [[ $steps == *k* ]]; then
  timeout $(left 100) python3 -m tools.bench_stream --model $M --budgets 4GiB --batches 1 --steps 8 --prefill-tokens 0 \
    --quantize int8 --out-dir $R --tag int8 > $R/bench_int8.log 2>&1; echo "int8 rc=$?"; tail -3 $R/bench_int8.log
fi
tar czf $OUT/results.tar.gz -C $R .
