#!/usr/bin/env bash
# The lent GPU machine has torch, triton, transformers and accelerate but not gguf, fastapi, uvicorn,
# pydantic, openai, py-spy or compressed-tensors (the quant tests pack with it), and no network. Run this here (it needs the package index) to download those
# wheels for the machine's Python (3.12, x86_64) into .devwheels/ (git-ignored: add `/.devwheels/` to
# .git/info/exclude); pass `carry: [".devwheels"]` to the device tool, and the bench/*.sh scripts
# install them first (bench/common.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devwheels
pip download -q --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 -d .devwheels gguf==0.19.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection annotated-types annotated-doc click sniffio \
  openai==3.57.0 jiter distro httpx2 httpcore2 opentelemetry-api typing-extensions py-spy \
  compressed-tensors==0.20.1 loguru==0.7.3
ls .devwheels | wc -l
