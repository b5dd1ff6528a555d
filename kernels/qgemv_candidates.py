"""The quantized decode GEMV's launch configs (kernels.qgemv): the tiles the tuner times per variant.

M == 1: _FMA_SHAPES (variant 0), _WORD_SHAPES (1); M >= 2: _DOT_SHAPES, _SWAP_SHAPES (0) and _SPLIT_SHAPES (3);
M <= 4 also _I8_SHAPES / _I8_ROWS_SHAPES (4, kernels/qgemv_i8.py); each with split-K where the grid lacks
programs. Tests pin configs with :func:`config`.
"""
from __future__ import annotations

import os

import triton

from kernels import qgemv_i8
from kernels.quant_variants import variant_ok

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_N, BLOCK_K, num_warps, num_stages)
_FMA_SHAPES = [(8, 512, 4, 2), (16, 512, 4, 2), (8, 1024, 4, 2)]
# variant 1: the H200 sweep's fastest tiles (session 11: 32x512 for gate_up, 16x512 for qkv / o, 8x1024 for
# down, all 4 warps, 3 stages) and tiles of one 128-column group, whose scales come once per row and whose
# threads hold 128-256 codes: 4.2-4.8 sm_90 instructions per code against 5.8-7.0 (tests/test_kernels_qgemv_sm90.py)
_WORD_SHAPES = [(16, 512, 4, 3), (32, 512, 4, 3), (8, 1024, 4, 3), (128, 128, 4, 3), (256, 128, 4, 3)]
# variant 4 (kernels/qgemv_i8.py: x in int8, dp4a): the H200 sweep's fastest tiles at M = 1 (session 13: 32x256 at
# 4 warps for gate_up, at 8 for qkv; 128x128 pipelined for down and o; bench/results/2026-12-02-h200-s13/), most of
# them without the software pipeliner: 1.1-2.2 sm_90 instructions per code (Triton 3.6) against 4.2-7.0
# A fifth entry caps the registers a thread may use (Triton's maxnreg): left alone, ptxas keeps these unpipelined
# loops at 32-48 registers by issuing the loads of x's steps and sums and of the scales and zero points only after the
# first dot products, so each K step waits on memory twice; allowed 48-96, it issues every load of the step first,
# without spilling (sm_90, Triton 3.6 and 3.9: tests/test_kernels_qgemv_sm90.py). Session 34's H200 ladder
# (bench/results/2026-12-05-h200-s34/call2/) found the capped 16x512 tile fastest at every 7B projection; the
# re-tuned picks took it and 16x1024 at 8 warps; 16x256 and 8x1024 (capped 96) are its untimed neighbours. 128x128
# pipelined left with the [NBLK, BLOCK_N, 4] tile (kernels/qgemv_i8.py's TRANS): Triton 3.9 spills it (24 bytes), and no
# batch-1 best at the 7B's shapes took it in either layout (bench/results/2026-12-05-h200-s38/call1/probe_m1_w0t*.txt)
_I8_SHAPES = [(32, 256, 4, 1), (32, 256, 8, 1), (64, 256, 8, 1),
              (32, 256, 4, 1, 64), (32, 256, 8, 1, 48), (64, 256, 8, 1, 64), (16, 512, 4, 1, 64), (16, 256, 4, 1),
              (16, 1024, 8, 1, 64), (8, 1024, 4, 1, 96)]
# ... at M = 2-4 (the sweep's fastest: 32x128 and 32x256 at 8 warps, 256x128 with 2 stages for gate_up at M = 4)
_I8_ROWS_SHAPES = [(32, 128, 8, 1), (32, 256, 8, 1), (256, 128, 4, 2), (64, 128, 8, 3),
                   (32, 128, 8, 1, 64), (32, 256, 8, 1, 96)]
_DOT_SHAPES = [(16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3)]
_SWAP_SHAPES = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3)]
# variant 3 (without swap: 1.4-2.4x slower); 256x128 at 8 warps: 5.8 sm_90 instructions per code at M = 16 against
# 7.1 and 9.7 for the other two (tests/test_kernels_qgemv_sm90.py compiles them)
_SPLIT_SHAPES = [((64, 256, 4, 3), True), ((128, 128, 8, 3), True), ((256, 128, 8, 3), True)]
_SPLITS = (1, 2, 4, 8)


def config(bn: int, bk: int, sk: int = 1, swap: bool = False, warps: int = 4, stages: int = 1,
           ticket: bool = False, variant: int = 0, maxnreg: int | None = None) -> triton.Config:
    """One launch config (tests pin configs with it); ``variant`` as kernels/quant_variants.py; ``maxnreg``
    (variant 4 only): the registers a thread may use, as the key MAXNREG (only when set, so the picks stored
    before it still name their configs)."""
    assert maxnreg is None or variant == 4 and maxnreg > 0, (maxnreg, variant)
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "SWAP_AB": swap, "TICKET": ticket,
                          "VARIANT": variant, **({"MAXNREG": maxnreg} if maxnreg else {})},
                         num_warps=warps, num_stages=stages)


_DEFAULT_FMA = config(64, 64) if _INTERPRET else config(8, 512, stages=2)  # interpreted: fewer, wider programs
_DEFAULT_DOT = config(64, 64) if _INTERPRET else config(32, 128, stages=2)


def _candidates(block_m: int, N: int, K: int, sms: int, group: int = 128, bits: int = 4,
                int8_x: bool = False) -> list[triton.Config]:
    """Configs worth timing (one under the interpreter); split-K only where the grid lacks programs,
    variants only where they can run this group size (kernels.quant_variants.variant_ok); variant 4
    (x rounded to int8) only with ``int8_x``: at most kernels.qgemv_i8.MAX_M rows, not fp32 x (an fp32
    run asks for accuracy first)."""
    if _INTERPRET:
        return [config(64, 64, 2 if K >= 128 else 1)]  # interpreted: fewer, wider programs
    if block_m == 1:
        shapes = [(s, False, 0) for s in _FMA_SHAPES] + [(s, False, 1) for s in _WORD_SHAPES]
    else:
        shapes = [(s, False, 0) for s in _DOT_SHAPES] + [(s, True, 0) for s in _SWAP_SHAPES] + \
            [(s, swap, 3) for s, swap in _SPLIT_SHAPES]
    if int8_x and qgemv_i8.enabled() and K % qgemv_i8.QBLOCK == 0:  # the caller's rows are at most MAX_M
        shapes += [(s, False, 4) for s in (_I8_SHAPES if block_m == 1 else _I8_ROWS_SHAPES)]
    out = []
    for (bn, bk, warps, stages, *regs), swap, variant in shapes:
        if not variant_ok(variant, group, bits, bk):
            continue
        for sk in _SPLITS:
            if sk > 1 and (triton.cdiv(N, bn) * sk > 6 * sms or triton.cdiv(K, bk) < 2 * sk):
                continue
            out.append(config(bn, bk, sk, swap, warps, stages, ticket=sk > 1, variant=variant,
                              maxnreg=regs[0] if regs else None))
    return out
