# Fused residual add + RMSNorm + the int8-x GEMV's rounding of the normed rows (decode: 1-4 rows).
#
# Why: where the tuner runs a projection that follows a norm (qkv, gate_up) on the int8-x GEMV
# (kernels/qgemv_i8.py), its stage 1 is a launch of its own that reads the normed rows back. Here the norm's
# program rounds them as it computes them: the decode layer loses a launch per such projection.
# Shapes:  x, residual [M, K] contiguous, one float dtype; weight [K]; K % 32 == 0
#          -> new_residual [M, K] (x.dtype) and stage 1's operands (kernels/quant_x.py): xq int32 [M, K/4],
#          steps fp32 [M, K/32], code sums int32 [M, K/32]. The normed rows themselves are not written.
# Math:    new_residual and the normed row as kernels/add_rmsnorm.py computes them (rounded to x.dtype), then
#          per 32 columns the rounding of kernels/quant_x.py's _quant_x_kernel: the same codes.
# Grid:    (M,), one row a program, BLOCK_N = next_pow2(K), num_warps as kernels.rmsnorm.row_blocking (at 1-4
#          rows add_rmsnorm's own blocking is one row a program too).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.add_rmsnorm import MAX_N, residual_norm
from kernels.qgemv_i8 import launch_i8, tuned_pick
from kernels.rmsnorm import row_blocking
from kernels.pdl import enter as pdl_enter, opts as pdl_opts


@triton.jit
def _add_rmsnorm_i8_kernel(x_ptr, r_ptr, w_ptr, res_out_ptr, xq_ptr, d_ptr, qs_ptr, K, eps,
                           BLOCK_N: tl.constexpr, PDL_CHAIN: tl.constexpr = False):
    pdl_enter(PDL_CHAIN)
    # a [1, BLOCK_N] tile through kernels/add_rmsnorm.py's own arithmetic (BLOCK_R = 1 there at decode)
    row = tl.program_id(0).to(tl.int64)
    y, _, _ = residual_norm(x_ptr, r_ptr, w_ptr, res_out_ptr, row + tl.arange(0, 1), row + 1, K, eps, BLOCK_N)
    y = y.to(res_out_ptr.dtype.element_ty).to(tl.float32)  # the normed row as add_rmsnorm stores it
    y = tl.reshape(y, (BLOCK_N // 32, 4, 4, 2))  # column 32b + 8j + 2p + h
    amax = tl.max(tl.max(tl.max(tl.abs(y), axis=3), axis=2), axis=1)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = y * inv[:, None, None, None]
    a = tl.floor(tl.abs(v) + 0.5)  # half away from zero, as _quant_x_kernel
    q = tl.where(v < 0, -a, a).to(tl.int32)
    qs = tl.sum(tl.sum(tl.sum(q, axis=3), axis=2), axis=1)
    p = tl.arange(0, 4)
    words = tl.sum((q & 0xFF) << (p[None, None, :, None] * 8), axis=2)  # [blocks, 4, 2]: disjoint bytes
    blk = tl.arange(0, BLOCK_N // 32)
    j, h = tl.arange(0, 4), tl.arange(0, 2)
    widx = blk[:, None, None] * 4 + j[None, :, None] + h[None, None, :] * (K // 8)
    bok = blk < K // 32
    tl.store(xq_ptr + row * (K // 4) + widx, words, mask=bok[:, None, None])
    tl.store(d_ptr + row * (K // 32) + blk, d, mask=bok)
    tl.store(qs_ptr + row * (K // 32) + blk, qs, mask=bok)


def add_rmsnorm_i8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x + residual rounded to x's dtype, stage 1 (kernels/quant_x.py) on rmsnorm(x + residual) * weight):
    the same residual as kernels.add_rmsnorm and the same codes as its normed rows through quantize_x."""
    m, k = x.shape if x.dim() == 2 else (0, 0)
    if x.dim() != 2 or residual.shape != x.shape or weight.shape != (k,) or k % 32 or residual.dtype != x.dtype:
        raise ValueError(f"add_rmsnorm_i8: x and residual [M, K] (K % 32 == 0) of one dtype and weight [K], got "
                         f"{tuple(x.shape)} {x.dtype}, {tuple(residual.shape)} {residual.dtype}, {tuple(weight.shape)}")
    if not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()):
        raise ValueError("add_rmsnorm_i8: x, residual and weight must be contiguous")
    new_residual = torch.empty_like(x)
    xq = torch.empty((m, k // 4), device=x.device, dtype=torch.int32)
    d = torch.empty((m, k // 32), device=x.device, dtype=torch.float32)
    qs = torch.empty((m, k // 32), device=x.device, dtype=torch.int32)
    _, block_n, warps = row_blocking(m, k, 2 * x.element_size(), x.device)
    _add_rmsnorm_i8_kernel[(m,)](x, residual, weight, new_residual, xq, d, qs, k, float(eps), BLOCK_N=block_n,
                                 num_warps=warps, **pdl_opts(x))
    return new_residual, (xq, d, qs)


def add_rmsnorm_qgemv(x: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, q: torch.Tensor,
                      s: torch.Tensor, z: torch.Tensor | None, bits: int, bias: torch.Tensor | None = None,
                      mins: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(qgemv(add_rmsnorm(x, residual)[0], ...), new residual)`` in two launches instead of three, when the
    tuner's pick for that GEMV is the int8-x one (kernels.qgemv_i8.tuned_pick); None otherwise (the caller runs
    both)."""
    if x.dim() != 2 or not x.is_contiguous() or x.shape[1] > MAX_N:
        return None
    pick = tuned_pick(x.shape[0], x.shape[1], x.dtype, x.device, q, s, z, bits, bias, mins)
    if pick is None:
        return None
    cfg, group, zz, asm = pick
    new_residual, rounded = add_rmsnorm_i8(x, residual, norm_w, eps)
    out = torch.empty((x.shape[0], q.shape[0]), device=x.device, dtype=x.dtype)
    launch_i8(cfg, x, q, s, zz, group, bias, out, mins is not None, asm, rounded=rounded)
    return out, new_residual
