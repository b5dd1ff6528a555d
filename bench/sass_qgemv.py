"""Instructions per packed code in the quantized decode GEMV's K loop, compiled for sm_90 on the CPU
(Triton's bundled ptxas and cuobjdump; no GPU): the kernel is bound by instruction issue (H200 sweep,
bench/results/2026-12-02-h200-s11/call4/), so this count is its static cost. Run with TRITON_INTERPRET=0;
PYTHONPATH picks the Triton (the GPU machine has 3.6). Prints one line per tile."""
from __future__ import annotations

import argparse
import sys

import triton

from tests.test_kernels_qgemv_sm90 import (GROUP, K, _compile, compile_i8, load_use_distances, loads_after_first_dot,
                                          loop_instructions)

TILES = {1: [(16, 512, 4, 3), (32, 512, 4, 3), (32, 512, 8, 2), (8, 1024, 4, 3), (32, 256, 4, 4),
             (64, 256, 8, 1), (128, 128, 4, 3), (256, 128, 4, 3)],
         16: [(64, 256, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    args = p.parse_args()
    from kernels.quant_common import scale_mode
    print(f"triton {triton.__version__}, int{args.bits} g{GROUP} zeros, K={K}, bf16 x, sm_90")
    for block_m, tiles in TILES.items():
        for bn, bk, warps, stages in tiles:
            mode = scale_mode(GROUP, K, bk)
            meta = dict(HAS_ZEROS=True, HAS_MINS=False, HAS_BIAS=False, BITS=args.bits, IS_FP32=False, UPCAST=False,
                        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, EVEN_K=True, SWAP_AB=block_m > 1,
                        TICKET=False, SCALE_MODE=mode, GROUP_C=GROUP if mode == 1 else 1,
                        VARIANT=1 if block_m == 1 else 3, STAGES=stages, ASM=True)
            usage, sass = _compile(meta, warps, stages)
            codes = bn * bk // (32 * warps)
            loop = loop_instructions(sass)
            stack = usage.split("STACK:")[1].split()[0]
            print(f"M={block_m:<3d}{bn:>4d}x{bk:<5d}w{warps} s{stages}: loop {loop:5d} / {codes:3d} codes = "
                  f"{loop / codes:5.2f} per code, stack {stack}", flush=True)
    if args.bits == 4:
        i8_rows()
    return 0


def i8_rows() -> None:
    """The same count for kernels/qgemv_i8.py's tiles (x in int8, dp4a) at 1, 2 and 4 rows of x (with their
    register caps, kernels.qgemv_candidates' fifth entry), how many instructions after its load the loop first uses each
    code load (the fewest), the registers, and how many loads the loop issues after its first dot product (each a
    second wait on memory in a K step)."""
    from kernels import qgemv as q
    for rows in (1, 2, 4):
        for bn, bk, warps, stages, *regs in (q._I8_SHAPES if rows == 1 else q._I8_ROWS_SHAPES) + [(512, 128, 8, 3)]:
            cap = regs[0] if regs else None
            usage, sass = compile_i8(rows, bn, bk, warps, stages, cap)
            codes, loop = bn * bk // (32 * warps), loop_instructions(sass)
            used = min(load_use_distances(sass), default=None)  # None: the pipeliner's copies, no plain loads
            print(f"i8x M={rows} {bn:>4d}x{bk:<5d}w{warps} s{stages} cap {cap or '-':>3}: loop {loop:5d} / {codes:3d} "
                  f"codes = {loop / codes:5.2f} per code, codes used {'-' if used is None else used:>3} after their "
                  f"load, {usage.split()[0]}, {loads_after_first_dot(sass)} loads after the first dot, "
                  f"stack {usage.split('STACK:')[1].split()[0]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
