# Sourced by the bench/*.sh scripts on the GPU machine: install the carried wheels (bench/devwheels.sh).
if ! python3 -c "import gguf, fastapi, uvicorn, openai" 2>/dev/null; then
  if ls .devwheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index .devwheels/*.whl > /dev/null 2>&1
  fi
  python3 -c "import gguf, fastapi, uvicorn, openai" 2>/dev/null || \
    echo "warning: gguf / fastapi / uvicorn / openai missing: run bench/devwheels.sh here and carry .devwheels"
fi
