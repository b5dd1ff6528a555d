"""Which of bench/ggml_sweep.py's launch candidates spill registers on sm_90, without a GPU.

    python bench/ggml_spills.py

Compiles every BLOCK_N x num_warps candidate (and SPLIT_K 2 at 4 warps) of the GGUF-block decode GEMV
(kernels/ggml_gemv.py) for Q4_K / Q6_K at M = 1 and 16 with Triton's bundled ptxas and prints each
one's registers, stack and local memory; a GPU sweep can leave the spilling ones out (about 90 s on
a 2-core CPU).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_kernels_ggml_config import compile_sweep_sm90  # noqa: E402

if __name__ == "__main__":
    compile_sweep_sm90()
