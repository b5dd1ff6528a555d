set -u; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; M=/tmp/q7b
python3 -m pip install -q --no-deps --no-index .devwheels/*.whl > /dev/null 2>&1
timeout 60 python3 -m tools.synth --preset qwen2.5-7b --out $M --device cuda 2>&1 | tail -1
LONG=$(python3 -c "print(' '.join(['hello'] * 8000))")
for v in "0 auto" "1 auto" "0 host"; do set -- $v
  s=$(date +%s)
  LAYERSTREAM_COMPILE_AHEAD=$1 timeout 70 python3 -m engine.run --model $M --vram-budget 6GB --no-chat --prompt "$LONG" \
    --max-new-tokens 4 --max-context 20000 --prefill-states $2 --json > /tmp/o.json 2> /tmp/e.txt
  echo "ahead=$1 states=$2 rc=$? $(( $(date +%s) - s )) s: $(tail -c 300 /tmp/e.txt | tr '\n' ' ' | cut -c1-200)"
  python3 -c "import json; d=json.load(open('/tmp/o.json')); s=d['stats']; print({k: s[k] for k in s if 'peak' in k or 'prefill' in k})" 2>/dev/null
done
