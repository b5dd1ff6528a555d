"""Where kernels/ggml_gemv.py's decode loop (M = 1, bf16 x, the fixed launch) issues its global loads, compiled
for sm_90 on the CPU (Triton's bundled ptxas and cuobjdump; no GPU), with and without a register cap (Triton's
maxnreg, kernels.ggml_gemv.check_config): per type the registers, the longest loop's instructions and how many of
its loads come after its first FFMA (each a second wait on memory in a K step). Run with
TRITON_INTERPRET=0; PYTHONPATH picks the Triton (the GPU machine has 3.6). Static facts, not timings."""
from __future__ import annotations

import torch
import triton

from kernels import ggml_gemv as g
from tests.test_kernels_ggml import PTR
from tests.test_kernels_qgemv_sm90 import compile_sm90, loads_after_first_dot, loop_instructions


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, M=1, bf16 x, fixed launch (launch_meta)")
    ptrs = {"x_ptr": PTR[torch.bfloat16], "blk": "*u8", "h": "*fp16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    for qtype in ("q4_k", "q6_k", "q4_1", "q8_0"):
        meta, warps = g.launch_meta(qtype, 1, torch.bfloat16, has_bias=False)
        for cap in (None, 64, 96, 128):
            usage, sass = compile_sm90(g._ggml_gemv_kernel, ptrs, meta, warps, 1, cap)
            print(f"{qtype} BN{meta['BLOCK_N']} w{warps} cap {cap or '-':>3}: {usage.split()[0]}, loop "
                  f"{loop_instructions(sass)}, {loads_after_first_dot(sass, 'FFMA')} loads after the first FFMA, "
                  f"stack {usage.split('STACK:')[1].split()[0]}", flush=True)


if __name__ == "__main__":
    main()
