# Quantized decode GEMV on int8 activations: out = x @ dequant(w).T + bias for x [M <= 4, K], int4 codes.
#
# Why: the fp32-unpacking GEMV (kernels/qgemv.py, variant "3d") looked bound by instruction issue, not memory: on the
# H200 its best tiles took 4.2-4.8 sm_90 instructions per 4-bit code (bench/sass_qgemv.py) and ran at 36-46% of a
# copy of the packed bytes (bench/results/2026-12-02-h200-s12/call2/probe.txt). Here x is first quantized to int8
# in blocks of 32 columns (one fp32 step each, as llama.cpp's q8_1 activations), so the K loop multiplies codes by
# x in integers: per packed word, two LOP3s and a shift give the 8 codes as two words of 4 bytes, and two DP4As
# (4 byte products each) add them into one int32; per 32 columns and row, one I2F and two FMAs apply the block's
# step and the weight's scale and zero point. That core is 0.64 instructions per code; with addressing the sm_90 K
# loop takes 1.1-2.2 per code for one row of x under Triton 3.6 (tests/test_kernels_qgemv_i8.py bounds them).
# Measured on the H200 (bench/results/2026-12-02-h200-s13/call2/, cold, M = 1): fewer instructions did not make it
# much faster, so the GEMV is not bound by issue alone: the sweep's best reached 51% of a copy for gate_up (the fp32
# path: 46%), 40 / 35 / 33% for down / qkv / o (43 / 40 / 38%); at M = 4 34% for gate_up against 28%.
#
# Shapes:  x       [M, K]      M <= 4, bf16 / fp16 / fp32, unit stride along K (K % 32 == 0)
#          qweight int32 [N, K/8]  int4 codes, layout of kernels/quant_common.py (code j*8+i at bits 4i..4i+3)
#          scales  [N, K/G]    fp16 / bf16 / fp32, G % 32 == 0; zeros like scales, or None (symmetric: 8);
#          mins    like scales or None (w = code * scale + min; zeros then None); bias [N] x's dtype or None
# Stage 1 (kernels/quant_x.py): x rounded to int8 per 32 columns, as words laid out for the loop below, with
#          each block's step d_b and code sum qs_b.
# Stage 2 (_qgemv_i8_kernel): program (n, s) owns BLOCK_N rows and the s-th of SPLIT_K slices of K; the codes
#          of a K step are unpacked once for all M rows of x (each its own accumulator):
#          acc[n] += sum_b s_nb * d_b * (dot_b(codes, q) - z_nb * qs_b)     (zeros; symmetric: z = 8)
#          acc[n] += sum_b d_b * (s_nb * dot_b(codes, q) + m_nb * qs_b)     (mins)
#          then the epilogue of kernels/gemv.py (bias, split-K partials summed by the last program).
#          Loading K steps ahead in registers (the codes used 134-209 sm_90 instructions after their load, against
#          7-11 here: bench/sass_qgemv.py) was never faster on the H200 (bench/results/2026-12-05-h200-s33/call1)
#          and was removed: its loop waited at its top on the loads it had just issued
#          (bench/results/2026-12-05-cpu-sass-scoreboard/). Left alone, ptxas keeps the unpipelined tiles at 32-48
#          registers by issuing the loads of x's steps and sums and of the scales and zero points after a step's
#          first dot products (a second wait on memory each step); the tuner also times those tiles with a register
#          cap (kernels.qgemv_candidates.config's maxnreg, 48-96), under which every load of a step goes out first
#          (bench/results/2026-12-05-cpu-sass-maxnreg/). On an H100 the fastest tiles for qkv and o at batch 1
#          were capped ones (MAXNREG=64; bench/results/2026-12-06-h100-s44/call1/probe_xround.txt).
#          Rounding x inside the GEMV (configs with XROUND, sessions 43-44: one launch, not two, for o_proj) was
#          slower on an H100: o_proj 11.6 us against 6.4 us with the rounding launch first, qkv 13.5 against 7.0;
#          the tuner picked no such tile, and it was removed (bench/results/2026-12-06-h100-s44/call1/).
# Accuracy: against fp32 torch on x itself, 0.4-1.1% relative error (Frobenius) in the tests' shapes with bf16
#          output (bf16 rounding alone: about 0.3%); tests bound it by 1.5%. x's rounding per 32 columns has about
#          2.5x the error of bf16's (more in a block holding an outlier channel): in a tiny Qwen2's batch-1 decode
#          the logits' largest error against fp32 went from 2.3-4.0% (bf16 x) to 2.7-7.7%
#          (tests/test_quant_parity.py; bench/results/2026-12-02-cpu-int8x-accuracy/). Not used for fp32 x (a
#          run that asks for accuracy first); the tuner (kernels/qgemv.py) times this as its variant 4 and keeps it
#          only if it is the fastest and agrees with fp32 torch within the tuner's check; LAYERSTREAM_INT8_X=0
#          leaves it out.
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.split_k import reduce_split_k, split_k_scratch, store_split_k
from kernels.pdl import enter as pdl_enter, opts as pdl_opts
from kernels.quant_x import QBLOCK, quantize_x, quantize_x_ref


# Loaded as [BLOCK_N, NBLK, 4], the codes' sm_90 layout puts a warp's lanes on 32 rows, 16 bytes each: the same
# K loop read gate_up's codes in 22.9-27.9 us that way against 16.8-17.7 us as a [BLOCK_N, BLOCK_K / 8] tile
# (bench/results/2026-12-05-h200-s37/call1/epilogue.txt). TRANS (the default) lays the tile out as
# [NBLK, BLOCK_N, 4]: a warp's lanes along a row's words, no shared memory (sm_90 loop 101 instructions and 10
# loads a step against 115 and 14 at 16 x 512). Its K loop alone reads as fast as the 2-D tile (17.4 us), and the
# batch-1 GEMV's best candidate at the 7B's shapes went from 8.7 / 8.2 / 28.9 / 21.2 us (qkv, o, gate_up, down;
# 45 / 40 / 61 / 53% of copy) to 6.3 / 6.1 / 20.4 / 13.6 us (63 / 54 / 88 / 83%) on an H200
# (bench/results/2026-12-05-h200-s38/call1/probe_m1_w0t*.txt). WORDS2D, opt-in (LAYERSTREAM_I8_TRANS=0
# LAYERSTREAM_I8_WORDS2D=1), loads the 2-D tile and views it as 3-D (a layout change through shared memory each
# K step, two barriers): 7.0 / 6.7 / 20.6 / 15.5 us in the same call.
WORDS2D = os.environ.get("LAYERSTREAM_I8_WORDS2D", "0").strip() not in ("0", "off", "false", "no")
TRANS = os.environ.get("LAYERSTREAM_I8_TRANS", "1").strip() not in ("0", "off", "false", "no")


def enabled() -> bool:
    """Whether the tuner may time this GEMV (``LAYERSTREAM_INT8_X=0`` keeps x in its own precision)."""
    return os.environ.get("LAYERSTREAM_INT8_X", "1").strip().lower() not in ("0", "off", "false", "no")


@triton.jit
def _dp4a2(a0, b0, a1, b1, ASM: tl.constexpr):
    """sum over the 4 signed bytes of a0 * b0 plus those of a1 * b1, as int32 (PTX dp4a with ASM)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .s32 t; dp4a.s32.s32 t, $1, $2, 0; dp4a.s32.s32 $0, $3, $4, t; }", "=r,r,r,r,r",
            [a0, b0, a1, b1], dtype=tl.int32, is_pure=True, pack=1)
    acc = tl.zeros_like(a0)
    for i in tl.static_range(4):  # the interpreter: bytes sign-extended by shifts
        acc += ((a0 << (24 - 8 * i)) >> 24) * ((b0 << (24 - 8 * i)) >> 24)
        acc += ((a1 << (24 - 8 * i)) >> 24) * ((b1 << (24 - 8 * i)) >> 24)
    return acc


@triton.jit
def _row_step(xq_ptr, d_ptr, qs_ptr, lo, hi, wcol, blk2, s, z, K, HAS_MINS: tl.constexpr, EVEN_K: tl.constexpr,
              ASM: tl.constexpr):
    """One x row's [BLOCK_N, NBLK] (TRANS: [NBLK, BLOCK_N]) contribution of a K step: its int8 words against the
    step's codes (lo / hi), times its steps, with the weight's scales and zero points (or mins) ``s`` / ``z``;
    ``wcol`` the step's words and ``blk2`` its 32-column blocks, shaped as the tile's axes."""
    # x's words are loaded at [1, NBLK, 4] and broadcast in registers: loaded in the tile's own [BLOCK_N, ...] shape,
    # the software pipeliner staged BLOCK_N copies of them in shared memory (57-360 KB a program; on the H200
    # 3-8% of a copy's rate, bench/results/2026-12-02-h200-s13/)
    x_lo = xq_ptr + wcol
    hi_off = tl.multiple_of(K // 8, 4)  # K % 32 == 0 (supports): x's high words start 16-byte aligned, so
    # each 4-word run loads as one 128-bit load, not two 64-bit ones (what K % 16 alone told the compiler)
    if EVEN_K:
        xlo = tl.load(x_lo, eviction_policy="evict_last")
        xhi = tl.load(x_lo + hi_off, eviction_policy="evict_last")
        d = tl.load(d_ptr + blk2, eviction_policy="evict_last")
        qs = tl.load(qs_ptr + blk2, eviction_policy="evict_last").to(tl.float32)
    else:
        ok3, ok2 = wcol < K // 8, blk2 < K // 32
        xlo = tl.load(x_lo, mask=ok3, other=0)
        xhi = tl.load(x_lo + hi_off, mask=ok3, other=0)
        d = tl.load(d_ptr + blk2, mask=ok2, other=0.0)
        qs = tl.load(qs_ptr + blk2, mask=ok2, other=0).to(tl.float32)
    dot = tl.sum(_dp4a2(lo, tl.broadcast_to(xlo, lo.shape), hi, tl.broadcast_to(xhi, hi.shape), ASM), axis=2)
    dot = dot.to(tl.float32)
    if HAS_MINS:
        return d * (s * dot + z * qs)
    return (s * d) * (dot - z * qs)


@triton.jit
def _qgemv_i8_kernel(xq_ptr, d_ptr, qs_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K, group, stride_qn, stride_sn, stride_om,
                     HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, TICKET: tl.constexpr,
                     ONE_GROUP: tl.constexpr, GROUP_C: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                     ASM: tl.constexpr, PDL_CHAIN: tl.constexpr = False, WORDS2D: tl.constexpr = False,
                     TRANS: tl.constexpr = False):
    pdl_enter(PDL_CHAIN)
    NBLK: tl.constexpr = BLOCK_K // 32
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # the tail block reads the last row again (no division); the store masks it
    num_k = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_k, SPLIT_K)
    kb_lo = tl.program_id(1) * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_k)
    b = tl.arange(0, NBLK)
    j = tl.arange(0, 4)
    # TRANS: the tile's axes [NBLK, BLOCK_N, 4], whose sm_90 layout puts a warp's lanes along a row's words
    # (bench/probe_epilogue.py's 3dT); else [BLOCK_N, NBLK, 4], whose lanes go down 32 rows, 16 bytes each
    if TRANS:
        q_rows = q_ptr + rows[None, :, None].to(tl.int64) * stride_qn
        s_rows = s_ptr + rows[None, :].to(tl.int64) * stride_sn
        z_rows = z_ptr + rows[None, :].to(tl.int64) * stride_sn
    else:
        q_rows = q_ptr + rows[:, None, None].to(tl.int64) * stride_qn
        s_rows = s_ptr + rows[:, None].to(tl.int64) * stride_sn
        z_rows = z_ptr + rows[:, None].to(tl.int64) * stride_sn
    q_rows2 = q_ptr + rows[:, None].to(tl.int64) * stride_qn
    c2 = tl.arange(0, NBLK * 4)
    # x rows past M repeat row M - 1 (computed, never stored)
    r1, r2, r3 = tl.minimum(1, M - 1), tl.minimum(2, M - 1), tl.minimum(3, M - 1)
    if TRANS:
        acc0 = tl.zeros((NBLK, BLOCK_N), dtype=tl.float32)
    else:
        acc0 = tl.zeros((BLOCK_N, NBLK), dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)
    acc2 = tl.zeros_like(acc0)
    acc3 = tl.zeros_like(acc0)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
        blk = kb * NBLK + b  # global 32-column blocks of this K step
        if TRANS:
            wcol = blk[:, None, None] * 4 + j[None, None, :]  # packed words [NBLK, 1, 4]
            blk2 = blk[:, None]
        else:
            wcol = blk[None, :, None] * 4 + j[None, None, :]  # packed words [1, NBLK, 4]
            blk2 = blk[None, :]
        if WORDS2D and not TRANS:  # the step's words as a 2-D tile, a row's run across a warp's lanes, viewed 3-D
            cols = kb * (NBLK * 4) + c2
            if EVEN_K:
                words = tl.load(q_rows2 + cols[None, :], eviction_policy="evict_first")
            else:
                words = tl.load(q_rows2 + cols[None, :], mask=(cols < K // 8)[None, :], other=0,
                                eviction_policy="evict_first")
            words = tl.reshape(words, (BLOCK_N, NBLK, 4))
        elif EVEN_K:
            words = tl.load(q_rows + wcol, eviction_policy="evict_first")
        else:  # words past K (the tail step's) read as 0
            words = tl.load(q_rows + wcol, mask=wcol < K // 8, other=0, eviction_policy="evict_first")
        if ONE_GROUP:  # the K step lies in one group (GROUP_C = G, a multiple of BLOCK_K): one scale per row
            g = (kb // (GROUP_C // BLOCK_K)) + tl.zeros((1, 1), tl.int32)
        elif GROUP_C > 1:  # G (a power of two) divides BLOCK_K: a constant shift
            g = tl.minimum(blk2 // (GROUP_C // 32), K // GROUP_C - 1)  # past K: the last group (terms 0)
        else:
            g = tl.minimum(blk2 * 32 // group, K // group - 1)
        s = tl.load(s_rows + g).to(tl.float32)
        if HAS_ZEROS + HAS_MINS > 0:
            z = tl.load(z_rows + g).to(tl.float32)
        else:
            z = tl.full((1, 1), 8.0, tl.float32)
        lo = words & 0x0F0F0F0F
        hi = (words >> 4) & 0x0F0F0F0F
        acc0 += _row_step(xq_ptr, d_ptr, qs_ptr, lo, hi, wcol, blk2, s, z, K, HAS_MINS, EVEN_K, ASM)
        if BLOCK_M > 1:
            acc1 += _row_step(xq_ptr + r1 * (K // 4), d_ptr + r1 * (K // 32), qs_ptr + r1 * (K // 32), lo, hi, wcol,
                              blk2, s, z, K, HAS_MINS, EVEN_K, ASM)
        if BLOCK_M > 2:
            acc2 += _row_step(xq_ptr + r2 * (K // 4), d_ptr + r2 * (K // 32), qs_ptr + r2 * (K // 32), lo, hi, wcol,
                              blk2, s, z, K, HAS_MINS, EVEN_K, ASM)
            acc3 += _row_step(xq_ptr + r3 * (K // 4), d_ptr + r3 * (K // 32), qs_ptr + r3 * (K // 32), lo, hi, wcol,
                              blk2, s, z, K, HAS_MINS, EVEN_K, ASM)
    offs_m = tl.arange(0, BLOCK_M)
    RED: tl.constexpr = 0 if TRANS else 1  # the K axis of the accumulators
    out = tl.where(offs_m[:, None] == 0, tl.sum(acc0, axis=RED)[None, :], 0.0)
    if BLOCK_M > 1:
        out = tl.where(offs_m[:, None] == 1, tl.sum(acc1, axis=RED)[None, :], out)
    if BLOCK_M > 2:
        out = tl.where(offs_m[:, None] == 2, tl.sum(acc2, axis=RED)[None, :], out)
        out = tl.where(offs_m[:, None] == 3, tl.sum(acc3, axis=RED)[None, :], out)
    store_split_k(out, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, rows, M, N, stride_om,
                  HAS_BIAS, SPLIT_K, TICKET, BLOCK_M, BLOCK_N)


MAX_M = 4  # x rows one launch takes (each row's int8 words against the codes unpacked once)


def supports(m: int, k: int, bits: int, group: int, block_k: int) -> bool:
    """Whether this GEMV can run these operands with tiles of ``block_k`` columns."""
    return 1 <= m <= MAX_M and bits == 4 and k % QBLOCK == 0 and group % QBLOCK == 0 and block_k % QBLOCK == 0


def register_cap(cfg: triton.Config) -> dict:
    """The launch option of ``cfg``'s register cap (kernels.qgemv_candidates.config's MAXNREG), or none."""
    return {"maxnreg": cfg.kwargs["MAXNREG"]} if cfg.kwargs.get("MAXNREG") else {}


def launch_i8(cfg: triton.Config, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
              group: int, bias: torch.Tensor | None, out: torch.Tensor, mins: bool, asm: bool,
              swiglu: bool = False, rounded: tuple | None = None) -> None:
    """One launch with ``cfg`` (kernels.qgemv_candidates.config's keys); operands checked by kernels.qgemv.
    ``swiglu``: x is [gate; up] [M, 2K] and the GEMV's input is silu(gate) * up (see :func:`quantize_x`);
    ``rounded``: stage 1's (xq, steps, sums) already computed (kernels/add_rmsnorm_i8.py), x only for its shape."""
    M, K, N = x.shape[0], x.shape[1] // 2 if swiglu else x.shape[1], q.shape[0]
    bn, bk, sk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.kwargs["SPLIT_K"]
    assert supports(M, K, 4, group, bk), (M, K, group, bk)
    xq, d, qs = rounded if rounded is not None else quantize_x(x, swiglu)
    ws, cnt = split_k_scratch(cfg, out, "qgemv_i8")
    b = bias if bias is not None else out
    shift = group % bk == 0 or bk % group == 0 and group & (group - 1) == 0  # the group index by a shift
    _qgemv_i8_kernel[(triton.cdiv(N, bn), sk)](
        xq, d, qs, q, s, s if z is None else z, b, out, ws, out if cnt is None else cnt,
        M, N, K, group, q.stride(0), s.stride(0), out.stride(0),
        HAS_ZEROS=z is not None and not mins, HAS_MINS=mins, HAS_BIAS=bias is not None,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, TICKET=cnt is not None,
        ONE_GROUP=group % bk == 0, GROUP_C=group if shift else 1, EVEN_K=K % bk == 0, STAGES=cfg.num_stages, ASM=asm,
        WORDS2D=WORDS2D, TRANS=TRANS, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_opts(out),
        **register_cap(cfg))
    reduce_split_k(ws, cnt, bias, out)


def tuned_pick(m: int, k: int, x_dtype: torch.dtype, device: torch.device, q: torch.Tensor, s: torch.Tensor,
               z: torch.Tensor | None, bits: int, bias: torch.Tensor | None, mins: torch.Tensor | None
               ) -> tuple[triton.Config, int, torch.Tensor | None, bool] | None:
    """For a fused path (a producer computing stage 1): kernels.qgemv's tuned config for x [m, k] of ``x_dtype``
    on this weight when it is this GEMV (variant 4), as (config, group, zeros or mins, asm); None when the shape
    is not tuned yet, another variant won, or the operands are not this GEMV's."""
    from kernels import qgemv as mod  # kernels.qgemv imports this module

    n = q.shape[0]
    if bits != 4 or q.shape[1] * 8 != k or s.shape[0] != n or not s.shape[1] or k % s.shape[1]:
        return None
    group, zz = k // s.shape[1], mins if mins is not None else z
    # the key kernels.qgemv's tuner stores: "zeros" says a zeros-or-mins operand exists (it was False for mins,
    # so the fused producers never ran for GGUF weights repacked with mins)
    key = mod.tuning_key(m, n, k, group, bits, zz is not None, mins is not None, x_dtype, s.dtype, bias is not None)
    cfg = mod._TUNED.get(key)
    if cfg is None or cfg.kwargs.get("VARIANT") != 4 or not supports(m, k, bits, group, cfg.kwargs["BLOCK_K"]):
        return None
    return cfg, group, zz, not mod._INTERPRET and device.type == "cuda" and torch.version.hip is None


def swiglu_qgemv(gate_up: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None = None, mins: torch.Tensor | None = None) -> torch.Tensor | None:
    """``qgemv(swiglu(gate_up), ...)`` in two launches instead of three, when this GEMV is what the tuner
    picked for that shape (:func:`tuned_pick`): x's int8 rounding computes the SwiGLU. None otherwise: the
    caller runs both."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
        return None
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    pick = tuned_pick(m, k, gate_up.dtype, gate_up.device, q, s, z, bits, bias, mins)
    if pick is None:
        return None
    cfg, group, zz, asm = pick
    out = torch.empty((m, q.shape[0]), device=gate_up.device, dtype=gate_up.dtype)
    launch_i8(cfg, gate_up, q, s, zz, group, bias, out, mins is not None, asm, swiglu=True)
    return out


def qgemv_i8_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                 rounded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """fp32 torch reference of stage 2's arithmetic on x rounded to int8 (``rounded``: stage 1's output through
    :func:`kernels.quant_x.decode_x`; default :func:`kernels.quant_x.quantize_x_ref`, which may round a code the
    other way where x / step lies within float error of a half), float32 [M, N]."""
    from kernels.quant_common import dequant_ref
    q, d = rounded if rounded is not None else quantize_x_ref(x)
    out = (q * d) @ dequant_ref(qweight, scales, zeros, 4, mins).T
    return out if bias is None else out + bias.float()
