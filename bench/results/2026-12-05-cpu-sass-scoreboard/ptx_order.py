"""The plain int8-x GEMV's K loop (32x256, 4 warps, one row of x, Triton 3.6, sm_90) in PTX: Triton emits every
load of a step (codes, scales, zero points, x's words, steps and sums) before the step's dp4a instructions, so it
is ptxas that issues the scale, step and sum loads after the first dot products (plain_loop_loads.txt).
Run: PYTHONPATH=<triton 3.6 wheel dir>:<tree> TRITON_INTERPRET=0 python ptx_order.py"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import qgemv_i8 as mod

fn = mod._qgemv_i8_kernel
ptrs = {"xq_ptr": "*i32", "d_ptr": "*fp32", "qs_ptr": "*i32", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
        "b_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
meta = dict(HAS_ZEROS=True, HAS_MINS=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1,
            TICKET=False, ONE_GROUP=False, GROUP_C=128, EVEN_K=True, STAGES=1, ASM=True, PDL_CHAIN=False)
names = fn.arg_names
sig = {a: "constexpr" if a in meta else ptrs.get(a, "i32") for a in names}
aligned = [a for a in names if a in ptrs or a in ("N", "K", "group", "stride_qn", "stride_sn")]
src = ASTSource(fn, sig, constexprs={(names.index(a),): v for a, v in meta.items()},
                attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1}).asm["ptx"]
for i, line in enumerate(ptx.splitlines()):
    line = line.strip()
    if "ld.global" in line or "dp4a" in line or re.match(r"^\$L__BB", line) or ("bra" in line and "@" in line):
        print(i, line[:100])
