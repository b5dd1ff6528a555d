# Faster unpacking paths of the quantized matmuls (kernels/qgemv.py, kernels/qgemm.py), chosen by
# the VARIANT constexpr of a launch config; the tuner (kernels.tuning.fastest) times them beside
# the base path (VARIANT 0: kernels.quant_common.load_dequant, which reshapes the unpacked
# [BN, BK/P, P] codes to [BN, BK], a layout conversion through shared memory on NVIDIA).
#
# Layout as kernels/quant_common.py: int32 words [N, K/P], P = 32 / BITS codes per word, column
# j * P + i in bits [i * BITS, (i + 1) * BITS) of word j.  None of these variants reshapes codes:
#   VARIANT 1 "3d"     (GEMV, M == 1): codes stay [BN, BW, P] (BW = BLOCK_K / P words), x is the
#                      contiguous [BW, P] tile; products are summed over P into [BN, BW].
#   (VARIANT 2, "imajor", one [BN, BW] slice per code position times a strided x load, was removed:
#    on the H200 it ran 1.3-1.6x slower than "3d" at every Qwen2.5-7B shape, bench/results/
#    2026-12-01-h200-s7-quant/probe_qkernels.txt.)
#   VARIANT 3 "split"  (tensor cores, qgemm and qgemv M >= 2): P dots of K = BW each,
#                      acc += x_i[BM, BW] @ w_i[BN, BW].T, with x_i the columns k0 + j * P + i
#                      (qgemm permutes x once per call on the host so each x_i is contiguous).
# Codes become floats without I2F: for 0 <= v < 2**23, bits(v | 0x4B000000) as fp32 is 2**23 + v
# exactly.  Code i is masked in place at bit p_i = min(i * BITS, 23 - BITS) (shifted down only by
# i * BITS - p_i, which is 0 for the low codes), so its float is code * 2**p_i; the 2**-p_i goes
# into x (GEMV) or into the scale (dots), exact power-of-two scalings.  GEMV factors the affine
# part out per word: sum_i (c_i - z) s x_i = s (sum_i c_i x_i - z xw), xw = sum_i x_i (with mins:
# s sum_i c_i x_i + m xw), so each code costs a mask, a subtract and an FMA.  On the GPU the mask and
# the magic bits are one PTX lop3 (ASM; ptxas spent two LOP3s, each taking one immediate), and the
# group of a word is a constant shift when GROUP_C is known (a runtime division cost ~2 instructions
# per code), and a 2**BITS offset per code, folded into the zero point, spares the top lanes their
# subtraction: the batch-1 loop of the 32x512 tile went from 9.1 to 5.8 sm_90 instructions per 4-bit
# code under Triton 3.6 (tests/test_kernels_qgemv_sm90.py keeps it within a budget).
# All variants need the P codes of a word in one group (G % P == 0): see :func:`variant_ok`.
from __future__ import annotations

import triton
import triton.language as tl

VARIANTS = {"base": 0, "3d": 1, "split": 3, "i8x": 4}  # 4: kernels/qgemv_i8.py (int8 x, dp4a; 1-4 rows, int4)
_MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2**23
_TWO23 = tl.constexpr(8388608.0)


def variant_ok(variant: int, group: int, bits: int, block_k: int) -> bool:
    """Whether ``variant`` can run group size ``group`` at ``bits`` with tiles of ``block_k`` columns
    (split dots need BLOCK_K / P >= 16, the tensor cores' smallest K)."""
    per = 32 // bits
    if variant == 0:
        return True
    if variant == 4:
        return bits == 4 and group % 32 == 0 and block_k % 32 == 0
    if variant not in (1, 3):  # 2 ("imajor") was removed; no other exists
        return False
    if group % per or block_k % per:
        return False
    return variant != 3 or block_k // per >= 16


@triton.jit
def _pos(i, BITS: tl.constexpr):
    """Bit p_i at which code i stays after its shift (below 2**23 with its BITS bits)."""
    return tl.minimum(i * BITS, 23 - BITS)


@triton.jit
def _pow2(e):
    """2**e exactly (int32 e in -126..127), built from its exponent bits."""
    return ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mask_or_magic(v, mask, ASM: tl.constexpr):
    """``(v & mask) | 0x4B000000``: one LOP3 with ASM (ptxas otherwise spends two, its LOP3 taking one
    immediate); the interpreter cannot run PTX, so it takes the plain expression."""
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [v, mask + tl.zeros_like(v), tl.full(v.shape, _MAGIC, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (v & mask) | _MAGIC


@triton.jit
def load_words(q_ptr, rows, stride_qn, k0, K, BITS: tl.constexpr, BW: tl.constexpr, EVEN_K: tl.constexpr):
    """The [BN, BW] int32 words of rows ``rows`` from column k0 (words past K read as 0, evict-first)."""
    PER: tl.constexpr = 32 // BITS
    offs_w = k0 // PER + tl.arange(0, BW)
    ptrs = q_ptr + rows[:, None].to(tl.int64) * stride_qn + offs_w[None, :]
    if EVEN_K:
        return tl.load(ptrs, eviction_policy="evict_first")
    return tl.load(ptrs, mask=offs_w[None, :] < K // PER, other=0, eviction_policy="evict_first")


@triton.jit
def word_scales(s_ptr, z_ptr, rows, stride_sn, k0, K, group, HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr,
                BITS: tl.constexpr, BW: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_C: tl.constexpr = 1):
    """fp32 (scale, zero-or-min) of each word of the tile: [BN, 1] when the tile lies in one group
    (SCALE_MODE 0), else [BN, BW] gathered by the word's group (words past K get 0, 0).  The zero is
    2**(BITS-1) when symmetric (no HAS_ZEROS / HAS_MINS)."""
    PER: tl.constexpr = 32 // BITS
    s_row = s_ptr + rows.to(tl.int64) * stride_sn
    z_row = z_ptr + rows.to(tl.int64) * stride_sn
    if SCALE_MODE == 0:
        g = k0 // group
        s = tl.load(s_row + g).to(tl.float32)[:, None]
        if HAS_ZEROS + HAS_MINS > 0:
            z = tl.load(z_row + g).to(tl.float32)[:, None]
        else:
            z = tl.full((s.shape[0], 1), 1 << (BITS - 1), tl.float32)
    else:
        offs_w = k0 // PER + tl.arange(0, BW)
        if SCALE_MODE == 1 and GROUP_C >= PER:  # k0 is a multiple of GROUP_C: constant shifts, no division
            g = (k0 // GROUP_C + tl.arange(0, BW) // (GROUP_C // PER))[None, :]
        else:
            g = ((offs_w * PER) // group)[None, :]
        mask = offs_w[None, :] < K // PER
        s = tl.load(s_row[:, None] + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS + HAS_MINS > 0:
            z = tl.load(z_row[:, None] + g, mask=mask, other=0.0).to(tl.float32)
        else:
            z = tl.full((s.shape[0], BW), 1 << (BITS - 1), tl.float32)
    return s, z


@triton.jit
def _words_affine(t, xw, s, z, HAS_MINS: tl.constexpr, BITS: tl.constexpr):
    """Per word, with t = sum_i (c_i + 2**BITS) x_i (:func:`gemv_tile`): s * (t - (z + 2**BITS) * xw), or with
    mins s * (t - 2**BITS * xw) + z * xw."""
    if HAS_MINS:
        return s * t + (z - s * (1 << BITS)) * xw[None, :]
    return s * (t - (z + (1 << BITS)) * xw[None, :])


@triton.jit
def gemv_tile(q_ptr, s_ptr, z_ptr, x_ptr, rows, stride_qn, stride_sn, k0, K, group,
              HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
              SCALE_MODE: tl.constexpr, EVEN_K: tl.constexpr, VARIANT: tl.constexpr, GROUP_C: tl.constexpr = 1,
              ASM: tl.constexpr = False):
    """fp32 [BN, BLOCK_K / P] partial sums of w[rows, k0:k0+BLOCK_K] * x[k0:k0+BLOCK_K] per word
    (VARIANT 1 "3d"); x_ptr points at x's row, columns past K count as 0.  ASM: the unpack's
    mask-and-magic as one PTX lop3 (the interpreter cannot run PTX)."""
    PER: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BLOCK_K // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_w = k0 // PER + tl.arange(0, BW)
    w_ok = offs_w < K // PER
    # words loaded as [BN, BW, 1]: the P codes of a word then stay in the thread that loaded it
    ptrs3 = q_ptr + rows[:, None, None].to(tl.int64) * stride_qn + offs_w[None, :, None]
    if EVEN_K:
        words = tl.load(ptrs3, eviction_policy="evict_first")
    else:
        words = tl.load(ptrs3, mask=w_ok[None, :, None], other=0, eviction_policy="evict_first")
    lane = tl.arange(0, PER)
    p = _pos(lane, BITS)
    x_ptrs = x_ptr + offs_w[:, None] * PER + lane[None, :]
    if EVEN_K:
        x2 = tl.load(x_ptrs, eviction_policy="evict_last").to(tl.float32)
    else:
        x2 = tl.load(x_ptrs, mask=w_ok[:, None], other=0.0, eviction_policy="evict_last").to(tl.float32)
    xw = tl.sum(x2, axis=1)
    v = mask_or_magic(words >> (lane * BITS - p)[None, None, :], (MASK << p)[None, None, :], ASM)
    # c = (code + 2**BITS) * 2**p: the lanes at the top bit (p = 23 - BITS) subtract 0.0, which folds away
    # (x + 0.0 would not); _words_affine takes the 2**BITS off per word
    off = _TWO23 - _pow2(BITS + p)
    c = v.to(tl.float32, bitcast=True) - off[None, None, :]
    t = tl.sum(c * (x2 * _pow2(-p)[None, :])[None, :, :], axis=2)
    s, z = word_scales(s_ptr, z_ptr, rows, stride_sn, k0, K, group, HAS_ZEROS, HAS_MINS, BITS, BW, SCALE_MODE,
                       GROUP_C)
    return _words_affine(t, xw, s, z, HAS_MINS, BITS)


@triton.jit
def split_dots(acc, words, s, z, x_ptrs, x_mask, XI: tl.constexpr, HAS_MINS: tl.constexpr,
               BITS: tl.constexpr, SWAP_AB: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
               ASM: tl.constexpr = False):
    """acc + sum_i x_i @ w_i.T (SWAP_AB: acc_t + sum_i w_i @ x_i.T) over the P codes of each word.

    words [BN, BW] int32, s / z per word (:func:`word_scales`), x_ptrs [BM, BW] the pointers of
    x_0 (x_i at x_ptrs + i * XI), x_mask broadcastable to them or None."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    dt = x_ptrs.dtype.element_ty
    for i in tl.static_range(PER):
        P_I = i * BITS if i * BITS <= 23 - BITS else 23 - BITS
        v = mask_or_magic(words >> (i * BITS - P_I), MASK << P_I, ASM)
        si = s * (1.0 / (1 << P_I))  # code * 2**P_I against scale * 2**-P_I
        if HAS_MINS:
            w = (v.to(tl.float32, bitcast=True) - _TWO23) * si + z
        else:
            w = (v.to(tl.float32, bitcast=True) - (z * (1 << P_I) + _TWO23)) * si
        if x_mask is None:
            xi = tl.load(x_ptrs + i * XI)
        else:
            xi = tl.load(x_ptrs + i * XI, mask=x_mask, other=0.0)
        w = w.to(dt)
        if UPCAST:
            w = w.to(tl.float32)
            xi = xi.to(tl.float32)
        if SWAP_AB:
            acc = _dot(w, tl.trans(xi), acc, IS_FP32)
        else:
            acc = _dot(xi, tl.trans(w), acc, IS_FP32)
    return acc


@triton.jit
def _dot(a, b, acc, IS_FP32: tl.constexpr):
    if IS_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
