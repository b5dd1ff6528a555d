# Shared tensor-core step of the matmul kernels (gemm, gemm_tma, gemv): acc += a @ b.T.
#
# Shapes:  a [R, BLOCK_K], b [C, BLOCK_K] (both K-contiguous tiles), acc [R, C] fp32.
# Dtypes:  bf16 / fp16 use the tensor cores' default precision; fp32 uses
#          input_precision="ieee" (no tf32), so fp32 results stay fp32-exact.
#          Under the CPU interpreter bf16 tiles must be upcast first (UPCAST): it
#          multiplies bf16 as raw uint16 bits.
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma_nt(a, b, acc, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b.T with fp32 accumulation."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IS_FP32:
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc
