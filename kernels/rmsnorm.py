# RMSNorm (Hugging Face LlamaRMSNorm semantics).
#
# Shapes:  x [..., N] (any number of leading dims), weight [N]  ->  out [..., N] (contiguous).
# Strides: x's last dim must be contiguous (stride 1).  After merging mergeable leading dims,
#          at most 3 leading dims may remain, each with an arbitrary stride (so per-head q/k
#          views [B, T, H, D] sliced out of a fused qkv projection work without a copy).
#          weight must be contiguous.  The output is a new contiguous tensor.
# Dtypes:  x in {bf16, fp16, fp32}; weight in {bf16, fp16, fp32}; out has x.dtype.
# Math:    fp32 internally: h = x * rsqrt(mean(x^2) + eps), rounded to x.dtype (as HF does),
#          then multiplied by weight in fp32 and rounded to x.dtype.
# Grid:    (cdiv(rows, BLOCK_R),); a program normalises BLOCK_R rows as one [BLOCK_R, BLOCK_N]
#          tile (rows flattened over the leading dims; the last program masks the tail) and loads
#          the weight once, in flight together with x (not after the reduction).  BLOCK_R: ~16 KB
#          of x per program (many rows for short rows such as per-head q/k norms, D = 128) while
#          keeping >= 2 programs per SM where possible; num_warps from the tile size.  A row of up
#          to MAX_N elements is held in registers.
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.checks import check_device
from kernels.fastlaunch import fast
from kernels.pdl import enter as pdl_enter, opts as pdl_opts

MAX_N = 65536
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE_BYTES = 16384  # bytes of (each) row input a program aims to hold


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, out_ptr,
    R, S1, S2,  # rows; sizes of the 2nd and 3rd (padded) leading dims
    sx0, sx1, sx2,  # strides of the 3 (padded) leading dims of x
    N, eps,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL_CHAIN: tl.constexpr = False,
):
    pdl_enter(PDL_CHAIN)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32 index math (R < 2**30)
    i2 = rows % S2  # trailing padded sizes are 1: specialised, the divisions fold away
    i1 = (rows // S2) % S1
    i0 = rows // (S2 * S1)
    mask = (rows < R)[:, None] & col_mask[None, :]
    x_rows = x_ptr + (i0.to(tl.int64) * sx0 + i1.to(tl.int64) * sx1 + i2.to(tl.int64) * sx2)[:, None]
    rows = rows.to(tl.int64)
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    out_ty = out_ptr.dtype.element_ty
    h = (x * rstd[:, None]).to(out_ty).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], (h * w).to(out_ty), mask=mask)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def row_blocking(rows: int, n: int, row_bytes_per_col: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps) of a row-wise norm kernel (also used by add_rmsnorm).

    ~_TILE_BYTES of input per program (row_bytes_per_col: input bytes per column of a row), but
    >= 2 programs per SM when there are enough rows; ~64 bytes of input per thread, 1..16 warps.
    """
    block_n = triton.next_power_of_2(n)
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    by_bytes = _prev_pow2(_TILE_BYTES // (block_n * row_bytes_per_col))
    block_r = min(by_bytes, _prev_pow2(rows // (2 * sms)))
    warps = min(16, _prev_pow2(block_r * block_n * row_bytes_per_col // 2048))
    return block_r, block_n, warps


def _leading_layout(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Merge x's leading dims where possible; return (sizes, strides) padded to 3 dims."""
    sizes: list[int] = []
    strides: list[int] = []
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size == 1:
            continue
        if sizes and stride == strides[0] * sizes[0]:
            sizes[0] *= size
        else:
            sizes.insert(0, size)
            strides.insert(0, stride)
    if len(sizes) > 3:
        raise ValueError(
            f"rmsnorm: x with shape {tuple(x.shape)} and strides {x.stride()} has more than 3 "
            "non-mergeable leading dims; pass a contiguous tensor"
        )
    while len(sizes) < 3:  # pad at the end: size-1 dims make the kernel's divisions trivial
        sizes.append(1)
        strides.append(0)
    return sizes, strides


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim of ``x`` and scale by ``weight`` (HF LlamaRMSNorm).

    ``x``: [..., N] bf16/fp16/fp32 with a contiguous last dim (leading dims may be strided);
    ``weight``: [N].  Returns a new contiguous tensor with x's shape and dtype.
    """
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rmsnorm: expected x [..., N] and weight [N], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rmsnorm: unsupported dtypes x={x.dtype}, weight={weight.dtype}")
    n = x.shape[-1]
    if n == 0 or n > MAX_N:
        raise ValueError(f"rmsnorm: last dim must be in [1, {MAX_N}], got {n}")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError(f"rmsnorm: x's last dim must be contiguous, got strides {x.stride()}")
    if not weight.is_contiguous():
        raise ValueError("rmsnorm: weight must be contiguous")
    check_device(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x.numel() // n
    if rows == 0:
        return out
    if rows >= 2**30:  # the kernel's row index math is int32
        raise ValueError(f"rmsnorm: at most 2**30 - 1 rows, got {rows}")
    sizes, strides = _leading_layout(x)
    block_r, block_n, warps = row_blocking(rows, n, x.element_size(), x.device)
    _rmsnorm_launch[(triton.cdiv(rows, block_r),)](
        x, weight, out, rows, sizes[1], sizes[2], strides[0], strides[1], strides[2],
        n, float(eps), BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, **pdl_opts(x),
    )
    return out


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 reference: ``weight * x * rsqrt(mean(x^2, -1) + eps)``, returned as float32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * h


_rmsnorm_launch = fast(_rmsnorm_kernel)  # launched through kernels.fastlaunch
