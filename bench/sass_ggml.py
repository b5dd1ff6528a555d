"""Where kernels/ggml_gemv.py's decode loop (M = 1, bf16 x, the fixed launch) issues its global loads, compiled
for sm_90 on the CPU (Triton's bundled ptxas and cuobjdump; no GPU), with and without a register cap (Triton's
maxnreg, kernels.ggml_gemv.check_config): per type the registers, the longest loop's instructions, where its first
FFMA is and how many of its loads come after it (each a second wait on memory in a K step). Run with
TRITON_INTERPRET=0; PYTHONPATH picks the Triton (the GPU machine has 3.6). Static facts, not timings."""
from __future__ import annotations

import re

import torch
import triton

from kernels import ggml_gemv as g
from tests.test_kernels_ggml import PTR
from tests.test_kernels_qgemv_sm90 import _loop_body, compile_sm90

LOAD = re.compile(r"(?:@!?P\d\s+)?LDG\.")


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, M=1, bf16 x, fixed launch (launch_meta)")
    ptrs = {"x_ptr": PTR[torch.bfloat16], "blk": "*u8", "h": "*fp16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    for qtype in ("q4_k", "q6_k", "q4_1", "q8_0"):
        meta, warps = g.launch_meta(qtype, 1, torch.bfloat16, has_bias=False)
        for cap in (None, 64, 96, 128):
            usage, sass = compile_sm90(g._ggml_gemv_kernel, ptrs, meta, warps, 1, cap)
            body = _loop_body(sass)
            first = next((i for i, line in enumerate(body) if "FFMA" in line), len(body))
            late, loads = sum(1 for line in body[first:] if LOAD.match(line)), sum(1 for line in body if LOAD.match(line))
            print(f"{qtype} BN{meta['BLOCK_N']} w{warps} cap {cap or '-':>3}: {usage.split()[0]}, loop {len(body)}, "
                  f"first FFMA at {first}, {late} of {loads} loads after it, {usage.split('STACK:')[1].split()[0]} "
                  "stack", flush=True)


if __name__ == "__main__":
    main()
