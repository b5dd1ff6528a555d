#!/bin/bash
# Alternated A/B of the CPU widening (engine/cpu_widen.py): the real SmolLM2-135M-Instruct Q4_1 GGUF,
# 100 new tokens, packed (LAYERSTREAM_CPU_WIDEN=0) against widened (the default), eight runs each.
M=${M:-/tmp/layerstream-gguf/SmolLM2-135M-Instruct.Q4_1.gguf}
for i in 1 2 3 4 5 6 7 8; do
  for arm in packed widened; do
    env=$([ $arm = packed ] && echo LAYERSTREAM_CPU_WIDEN=0 || echo LAYERSTREAM_CPU_WIDEN=1)
    echo "$arm $i $(env $env layerstream --model $M --prompt 'Write a long story about a dragon.' --max-new-tokens 100 2>&1 >/dev/null | grep '^finish')"
  done
done
