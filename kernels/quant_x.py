# Stage 1 of the int8-x GEMV (kernels/qgemv_i8.py): x [M, K] rounded to int8 in blocks of 32 columns, as
# llama.cpp's q8_1 activations, laid out for the GEMV's dp4a loop.
#
# Shapes:  x   [M, K]  bf16 / fp16 / fp32, unit stride along K, K % 32 == 0 (with SWIGLU: [gate; up] [M, 2K])
#          out xq int32 [M, K/4], d fp32 [M, K/32], qs int32 [M, K/32]
# Scheme:  per row and 32-column block b, step d_b = max|x| / 127, q = x / d_b rounded half away from zero (in
#          [-127, 127]), stored as int32 words xq[j] = bytes q[8j], q[8j+2], q[8j+4], q[8j+6] (the low nibbles'
#          columns of packed word j), xq[K/8 + j] = q[8j+1], q[8j+3], q[8j+5], q[8j+7] (the high nibbles');
#          qs = the sum of the block's q (for the zero point / min term). With SWIGLU x = silu(gate) * up, rounded
#          as kernels/swiglu.py rounds it (the same codes), so the MLP's down projection takes two launches.
# Reference: quantize_x_ref (fp32 torch), decode_x (the words back to codes and steps).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import enter as pdl_enter, opts as pdl_opts

QBLOCK = 32  # x columns per int8 step


@triton.jit
def _quant_x_kernel(x_ptr, xq_ptr, d_ptr, qs_ptr, K, stride_xm, NB: tl.constexpr, SWIGLU: tl.constexpr,
                    PDL_CHAIN: tl.constexpr = False):
    """NB blocks of 32 columns of row program_id(1) per program: steps, int8 codes in nibble order, code sums.
    SWIGLU: x_ptr holds [gate; up] rows of 2K and x = silu(gate) * up, rounded as kernels/swiglu.py rounds it."""
    pdl_enter(PDL_CHAIN)
    row = tl.program_id(1)
    blk = tl.program_id(0) * NB + tl.arange(0, NB)
    round_blocks(x_ptr + row.to(tl.int64) * stride_xm, xq_ptr + row * (K // 4), d_ptr + row * (K // 32),
                 qs_ptr + row * (K // 32), blk, blk < K // 32, K, SWIGLU)


@triton.jit
def round_blocks(x_ptr, xq_ptr, d_ptr, qs_ptr, blk, ok, K, SWIGLU: tl.constexpr):
    """The 32-column blocks ``blk`` (where ``ok``) of one row of x (``x_ptr``; the row's outputs at ``xq_ptr``,
    ``d_ptr``, ``qs_ptr``): steps, int8 codes in nibble order, code sums (:func:`_round_store`)."""
    w4 = tl.arange(0, 4)  # packed word within the block
    p = tl.arange(0, 4)  # byte within the x word
    h = tl.arange(0, 2)  # 0: low nibble's column (even), 1: high nibble's (odd)
    col = (blk[:, None, None, None] * 32 + w4[None, :, None, None] * 8 + p[None, None, :, None] * 2
           + h[None, None, None, :])
    x = tl.load(x_ptr + col, mask=ok[:, None, None, None], other=0.0).to(tl.float32)
    if SWIGLU:  # the same arithmetic as kernels/swiglu.py: the codes equal those of its output
        ty = x_ptr.dtype.element_ty
        u = tl.load(x_ptr + K + col, mask=ok[:, None, None, None], other=0.0).to(tl.float32)
        x = ((x * tl.sigmoid(x)).to(ty).to(tl.float32) * u).to(ty).to(tl.float32)
    _round_store(x, xq_ptr, d_ptr, qs_ptr, blk, ok, K)


@triton.jit
def round_tile(o, xq_ptr, d_ptr, qs_ptr, b, h0, n, K, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               OUT_TY: tl.constexpr):
    """Heads ``h0 .. h0 + n - 1`` of row ``b`` of a [B, K = heads x BLOCK_D] x, held as the fp32 [BLOCK_R, BLOCK_D]
    tile ``o`` in the calling program's registers (BLOCK_D the head dim, a power of two >= 32), rounded as
    :func:`quantize_x` rounds the values a store in ``OUT_TY`` would have written: the same codes, steps and sums.
    The decode attention's epilogue (kernels/attention_decode.py) calls it on its output before (not after) the
    store: no barrier, no reload. Timed on an H100, a 7B AWQ decode step was 3.7-4.4% slower with the older
    store-barrier-reload form (sessions 42-44) and 1-3% slower with this one (session 45, as built in 5f6ea9a,
    bench/results/2026-12-06-h100-s45/call4/) than with quantize_x's launch: the path stays opt-in."""
    NB: tl.constexpr = BLOCK_D // 32
    # a head's blocks follow the one before's: the tile's rows are blocks h0 * NB .. of the row, in order
    x = tl.reshape(o.to(OUT_TY).to(tl.float32), (BLOCK_R * NB, 4, 4, 2))
    i = tl.arange(0, BLOCK_R * NB)
    row = b.to(tl.int64)
    _round_store(x, xq_ptr + row * (K // 4), d_ptr + row * (K // 32), qs_ptr + row * (K // 32), h0 * NB + i,
                 i < n * NB, K)


@triton.jit
def _round_store(x, xq_ptr, d_ptr, qs_ptr, blk, ok, K):
    """fp32 x [NBLK, 4, 4, 2] of one row's 32-column blocks ``blk`` (column blk * 32 + word * 8 + byte * 2 + half;
    stored where ``ok``): each block's step (max|x| / 127), codes rounded half away from zero as words in nibble
    order, code sum."""
    w4 = tl.arange(0, 4)
    p = tl.arange(0, 4)
    h = tl.arange(0, 2)
    amax = tl.max(tl.max(tl.max(tl.abs(x), axis=3), axis=2), axis=1)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    y = x * inv[:, None, None, None]
    r = tl.floor(tl.abs(y) + 0.5)  # half away from zero
    q = tl.where(y < 0, -r, r).to(tl.int32)
    qs = tl.sum(tl.sum(tl.sum(q, axis=3), axis=2), axis=1)
    byte = (q & 0xFF) << (p[None, None, :, None] * 8)
    words = tl.sum(byte, axis=2)  # [NBLK, 4, 2]: disjoint bytes, so the sum is their OR
    widx = blk[:, None, None] * 4 + w4[None, :, None] + h[None, None, :] * (K // 8)
    tl.store(xq_ptr + widx, words, mask=ok[:, None, None])
    tl.store(d_ptr + blk, d, mask=ok)
    tl.store(qs_ptr + blk, qs, mask=ok)


def quantize_x(x: torch.Tensor, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (K % 32 == 0) -> per row (xq int32 [M, K/4]: the low then the high nibbles' words,
    steps fp32 [M, K/32], code sums int32 [M, K/32]). ``swiglu``: x is a contiguous [gate; up] [M, 2K] and
    the rows rounded are kernels.swiglu's ``silu(gate) * up`` (one launch less in a decode layer)."""
    m, k = x.shape[0], x.shape[1] // 2 if swiglu else x.shape[1]
    assert k % QBLOCK == 0 and x.stride(1) == 1 and (not swiglu or x.shape[1] == 2 * k)
    xq = torch.empty((m, k // 4), device=x.device, dtype=torch.int32)
    d = torch.empty((m, k // QBLOCK), device=x.device, dtype=torch.float32)
    qs = torch.empty((m, k // QBLOCK), device=x.device, dtype=torch.int32)
    nb = 4
    _quant_x_kernel[(triton.cdiv(k // QBLOCK, nb), m)](x, xq, d, qs, k, x.stride(0), NB=nb, SWIGLU=swiglu,
                                                       num_warps=1, **pdl_opts(x))
    return xq, d, qs


def quantize_x_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch reference of stage 1: (int8-valued codes as float [M, K], per-column steps [M, K])."""
    xb = x.float().reshape(-1, QBLOCK)
    amax = xb.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    y = xb * inv
    return ((torch.floor(y.abs() + 0.5) * torch.sign(y)).reshape(x.shape),
            (amax / 127.0).expand(-1, QBLOCK).reshape(x.shape))


def decode_x(xq: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's output as :func:`quantize_x_ref` gives it: (codes as float [M, K], per-column steps [M, K])."""
    m, k = xq.shape[0], xq.shape[1] * 4
    b = torch.stack([(xq >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.int8).float()  # [M, K/4, 4]
    codes = torch.stack([b[:, : k // 8], b[:, k // 8:]], dim=-1).reshape(m, k)  # column 8j + 2p + h
    return codes, d.float().repeat_interleave(QBLOCK, dim=1)
