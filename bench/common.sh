# Sourced by the bench/*.sh scripts on the GPU machine (bash).
# The carried wheels the machine lacks (gguf, fastapi, uvicorn, pydantic, openai; bench/devwheels.sh):
if ! python3 -c "import gguf, fastapi, uvicorn, openai, compressed_tensors" 2>/dev/null; then
  if ls .devwheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index .devwheels/*.whl > /dev/null 2>&1
  fi
  python3 -c "import gguf, fastapi, uvicorn, openai, compressed_tensors" 2>/dev/null || \
    echo "warning: gguf / fastapi / uvicorn / openai missing: run bench/devwheels.sh here and carry .devwheels"
fi

env_info() {  # device, software versions, host, date: each results folder's env.txt
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "
import importlib, torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, end='')
for m in ('transformers', 'accelerate', 'gptqmodel', 'awq'):  # the last two: can transformers load AWQ here?
    try:
        print(' ' + m, importlib.import_module(m).__version__, end='')
    except ImportError:
        print(' ' + m, 'missing', end='')
print()"
  nproc; lscpu | grep -E "Model name|^Core|^Socket|^Thread"; free -g | head -2; df -h /tmp | tail -1; date -u
  # the vector extensions torch's CPU kernels pick their paths by (the host lane's bf16 / int4 GEMVs)
  echo "cpu flags: $(grep -m1 -oE '\b(avx2|avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_bf16|amx_int8|amx_tile)\b' \
    /proc/cpuinfo | sort -u | tr '\n' ' ')"; python3 -c "import torch; print('torch cpu capability', torch.backends.cpu.get_cpu_capability())"
  echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null); last-level cache: $(lscpu | grep -m1 'L3' | tr -s ' ')"
}

synth_7b() {  # the synthetic Qwen2.5-7B (bf16) into $1 unless it is there
  [ -f $1/config.json ] || timeout 90 python3 -m tools.synth --preset qwen2.5-7b --out $1 --device cuda 2>&1 | tail -1
}

save() {  # results so far into $OUT (called after each step: a call cut by its time limit keeps them)
  tar czf "$OUT/results.tar.gz.tmp" -C "$R" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}
