#!/usr/bin/env bash
# A/B of the served synthetic 7B AWQ on one machine: tools.bench_serve at $AB_LEVELS clients (default 1,16), one
# server process per run, runs named in $AB_ORDER (default "new old new old"), each with the variables in
# AB_ENV_<name> (e.g. AB_ENV_new="LAYERSTREAM_FAST_LAUNCH=1") and the server flags in AB_ARGS_<name> (e.g.
# AB_ARGS_c8k="--prefill-chunk 8192"), alternated: server processes differ by tens of
# percent in host-bound passes and even in streamed GB/s (session 28), so only alternated runs compare.
# AB_PROFILE=N: each run's first N prompt passes under cProfile (engine/serving/passprof.py) into
# $OUT/<n><name>/passprof/. Each run's log, JSON, step log and TTFT breakdown in $OUT/<n><name>/; AB_T: seconds a run.
# Session 28 found direct launches + packed stacking faster in process (bench/ab_inplace.sh) but slower served:
#   AB_ORDER="fast old pack old" AB_ENV_fast=LAYERSTREAM_FAST_LAUNCH=1 AB_ENV_pack=LAYERSTREAM_STACK_PROMPTS=packed \
#   AB_PROFILE=2 bash bench/ab_serve.sh
# Session 29 ran that: neither faster served; the defaults' first burst pass took 281-840 ms from machine to machine
# (bench/results/2026-12-04-h200-s29/). AB_LEVELS=1,16,16,16 (AB_T=200) gives three bursts a server process.
# Session 30: a 280 MiB dense tile (AB_ENV_t280=LAYERSTREAM_DEQUANT_SCRATCH=280MiB) and --prefill-chunk 3072 won no pair;
# the 3072-row chunk ran passes out of memory (AB_ENV_<name>="PYTHONPATH=$PWD/bench/oomsite OOM_DUMP=$OUT/oom.json"
# dumps the live blocks: bench/oomsite); the step log's peak_mib column holds each pass's peak allocation.
# At the end, bench/ab_summary.py prints each run's passes and each arm's medians.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source bench/common.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; env_info > $OUT/env.txt 2>&1
[ -f /tmp/q7b-awq/config.json ] || python3 -m tools.synth --preset qwen2.5-7b --out /tmp/q7b-awq --quant awq --device cuda 2>&1 | tail -1
n=0; for i in ${AB_ORDER:-new old new old}; do n=$((n+1)); D=$OUT/$n$i; mkdir -p $D
  e=AB_ENV_$i; a=AB_ARGS_$i
  S="--model /tmp/q7b-awq --vram-budget 6GiB --max-batch 32 --max-context 2304 --step-log $D/steps.jsonl ${!a:-}"
  env ${!e:-} ${AB_PROFILE:+LAYERSTREAM_PROFILE_PASSES=$D/passprof:$AB_PROFILE} timeout ${AB_T:-150} \
    python3 -m tools.bench_serve --serve "$S" --clients ${AB_LEVELS:-1,16} --requests-per-client 1 \
    --prompt-tokens 128:2048 --max-tokens 128:256 --json $D/serve.json --server-log $D/server.log > $D/bench_serve.log 2>&1
  echo "== $n $i (${!e:-} ${!a:-}) rc=$?"; grep -E "clients:" $D/bench_serve.log | cut -c1-170
  python3 -m tools.ttft_breakdown $D/serve.json $D/steps.jsonl --config server > $D/ttft.txt 2>&1
  python3 - "$D/steps.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("   prompt passes (batch, tokens, ms, peak MiB):", [(r["batch"], r["tokens"], round(r["step_s"] * 1e3),
       r.get("peak_mib")) for r in rows if r["tokens"] > r["batch"] + 8][:8])
EOF
done
python3 bench/ab_summary.py $OUT
