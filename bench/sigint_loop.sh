#!/usr/bin/env bash
# Ctrl-C while `python -m engine.serve` starts: N runs (default 60), each sent one SIGINT after a random delay in
# [LO, HI] seconds (default 1.1-1.35: where the server's own imports run), counting exit codes (0 expected; 130 was
# CPython's unhandled-interrupt mark, engine.interrupts.forget_handled_interrupt). Run from a checkout with a venv.
#   bash bench/sigint_loop.sh MODEL_DIR [N] [LO] [HI]
set -u
model=$1; n=${2:-60}; lo=${3:-1.1}; hi=${4:-1.35}; declare -A codes
for i in $(seq 1 "$n"); do
  d=$(python3 -c "import random; print(round(random.uniform($lo, $hi), 3))")
  .venv/bin/python -m engine.serve --model "$model" --port $((18000 + RANDOM % 1000)) > /dev/null 2>&1 &
  pid=$!; sleep "$d"; kill -INT $pid; wait $pid; rc=$?; codes[$rc]=$(( ${codes[$rc]:-0} + 1 ))
done
echo "$(git rev-parse --short HEAD): $n runs, SIGINT after ${lo}-${hi} s, exit codes: $(for k in "${!codes[@]}"; do printf '%s x%s ' "$k" "${codes[$k]}"; done)"
