# Quantized weight -> dense rows: out[n, k] = dequant(qweight, scales, zeros or mins)[n, k], for the
# prefill path of kernels/qlinear.py (a compute-bound chunk runs the dense GEMM on these rows).
#
# Shapes:  qweight int32 [N, K*BITS/32]  codes packed along K (layout: kernels/quant_common.py)
#          scales  fp16 / bf16 / fp32 [N, K/G];  zeros (or additive mins) like scales, or None (symmetric)
#          out     [N, K] bf16 / fp16 / fp32, unit stride along K, any row stride (a slice of a larger tile)
#          (qweight, scales and zeros / mins may be column slices: any row stride, unit stride along K)
# Scheme:  memory-bound: one program per [BLOCK_N, BLOCK_K] tile reads its packed words, scales and
#          zeros once (kernels.quant_common.load_dequant, fp32 registers), casts and stores; the
#          packed bytes are read once and the dense ones written once.  One fixed launch config (no
#          tuning: a copy-like kernel; the GEMM that follows dominates a prefill chunk).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_common import dequant_ref, load_dequant, scale_mode
from kernels.fastlaunch import fast

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_S_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_N, BLOCK_K, NUM_WARPS = 32, 256, 8


def block_n(dtype: torch.dtype) -> int:
    """Rows per program: half for fp32 output, whose 32-row tile spills under Triton 3.6 at sm_90."""
    return BLOCK_N // 2 if dtype == torch.float32 else BLOCK_N


@triton.jit
def _qdequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, group, stride_qn, stride_sn, stride_on,
                     HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_MODE: tl.constexpr,
                     GROUP_C: tl.constexpr, EVEN_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = tl.minimum(offs_n, N - 1)  # the tail block reads the last row again (no division); the store masks it
    w = load_dequant(q_ptr, s_ptr, z_ptr, rows, stride_qn, stride_sn, k0, K, group, HAS_ZEROS, BITS,
                     BLOCK_N, BLOCK_K, SCALE_MODE, GROUP_C, EVEN_K, HAS_MINS)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def _check(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           mins: torch.Tensor | None, out: torch.Tensor) -> int:
    """Validate the operands; returns the group size G."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if qweight.dim() != 2 or qweight.dtype != torch.int32 or scales.dim() != 2:
        raise ValueError(f"qweight must be int32 [N, K*bits/32] and scales 2-D, got qweight {qweight.dtype} "
                         f"{tuple(qweight.shape)}, scales {tuple(scales.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * (32 // bits)
    if scales.dtype not in _S_DTYPES or scales.shape[0] != n or scales.shape[1] < 1 or k % scales.shape[1]:
        raise ValueError(f"scales must be fp16/bf16/fp32 [N={n}, K/G] with K/G dividing K={k}, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    for name, t in (("zeros", zeros), ("mins", mins)):
        if t is not None and (t.shape != scales.shape or t.dtype != scales.dtype):
            raise ValueError(f"{name} must match scales ({scales.dtype} {tuple(scales.shape)}), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if zeros is not None and mins is not None:
        raise ValueError("give zeros or mins, not both")
    if out.shape != (n, k) or out.dtype not in _OUT_DTYPES or (n and out.stride(1) != 1):
        raise ValueError(f"out must be bf16/fp16/fp32 [{n}, {k}] with unit stride along K, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("mins", mins)):
        if t is not None and (t.device != out.device or (t.numel() and t.stride(1) != 1)):
            raise ValueError(f"{name} must have unit stride along K and be on out's device ({out.device})")
    for name, t in (("zeros", zeros), ("mins", mins)):  # the kernel reads them with the scales' row stride
        if t is not None and t.stride(0) != scales.stride(0):
            raise ValueError(f"{name} must have the scales' row stride {scales.stride(0)}, got {t.stride(0)}")
    return k // scales.shape[1]


def qdequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
             dtype: torch.dtype = torch.bfloat16, mins: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[N, K]`` weight of a packed one (``w = (code - zero) * scale``, or ``code * scale + min``
    with ``mins``; symmetric without either), in ``dtype``, written into ``out`` when given (e.g. rows of
    a larger tile). Columns stay in packed order (act-order weights: permute x, not the weight). The packed
    operands may be column slices of wider ones (any row stride, unit stride along K; a slice starting on a
    group boundary): columns ``c0:c1`` of a weight, a chunked MLP's piece of ``down_proj``."""
    if out is None:
        out = torch.empty((qweight.shape[0], qweight.shape[1] * (32 // bits) if bits in (4, 8) else 0),
                          dtype=dtype, device=qweight.device)
    group = _check(qweight, scales, zeros, bits, mins, out)
    n, k = out.shape
    if n == 0 or k == 0:
        return out
    z = mins if mins is not None else zeros
    mode, bn = scale_mode(group, k, BLOCK_K), block_n(out.dtype)
    _qdequant_launch[(triton.cdiv(n, bn), triton.cdiv(k, BLOCK_K))](
        qweight, scales, scales if z is None else z, out, n, k, group, qweight.stride(0), scales.stride(0),
        out.stride(0), HAS_ZEROS=zeros is not None, HAS_MINS=mins is not None, BITS=bits, BLOCK_N=bn,
        BLOCK_K=BLOCK_K, SCALE_MODE=mode, GROUP_C=group if mode == 1 else 1, EVEN_K=k % BLOCK_K == 0,
        num_warps=NUM_WARPS)
    return out


def qdequant_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`qdequant` (kernels.quant_common.dequant_ref)."""
    return dequant_ref(qweight, scales, zeros, bits, mins)


_qdequant_launch = fast(_qdequant_kernel)  # launched through kernels.fastlaunch
