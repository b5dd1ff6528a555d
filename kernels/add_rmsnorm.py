# Fused residual add + RMSNorm (HF decoder-layer "residual + hidden; norm(residual)").
#
# Shapes:  x [..., N], residual [..., N] (same shape), weight [N]
#          -> (normed [..., N], new_residual [..., N]), both new contiguous tensors.
# Strides: x and residual must be contiguous (rows of N elements, row stride N); weight contiguous.
# Dtypes:  x, residual in {bf16, fp16, fp32} and equal; weight in {bf16, fp16, fp32};
#          both outputs have x.dtype.
# Math:    new_residual = round_to_dtype(x + residual) (fp32 add, like torch's bf16 add);
#          normed = rmsnorm(new_residual) with the same fp32 math as kernels/rmsnorm.py.
# Grid:    (cdiv(rows, BLOCK_R),), single pass: a program loads BLOCK_R rows of x and residual
#          once as [BLOCK_R, BLOCK_N] tiles (the last program masks the tail), the weight once,
#          and writes both outputs.  BLOCK_R / num_warps: kernels.rmsnorm.row_blocking (~16 KB of
#          x + residual per program, >= 2 programs per SM where possible).
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.checks import check_device
from kernels.rmsnorm import row_blocking
from kernels.fastlaunch import fast
from kernels.pdl import enter as pdl_enter, opts as pdl_opts

MAX_N = 65536
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def residual_norm(x_ptr, r_ptr, w_ptr, res_out_ptr, rows, R, N, eps, BLOCK_N: tl.constexpr):
    """Rows ``rows`` ([BLOCK_R]) of x + residual stored at res_out_ptr (rounded to its dtype); returns the
    normed rows times the weight [BLOCK_R, BLOCK_N] in fp32 (the norm rounded to that dtype first), and the
    tile's offsets and mask (also kernels/add_rmsnorm_i8.py)."""
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = (rows < R)[:, None] & col_mask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out_ty = res_out_ptr.dtype.element_ty
    s = (x + r).to(out_ty)
    tl.store(res_out_ptr + offs, s, mask=mask)
    s = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / N + eps)
    h = (s * rstd[:, None]).to(out_ty).to(tl.float32)
    return h * w, offs, mask


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
    R, N, eps,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL_CHAIN: tl.constexpr = False,
):
    pdl_enter(PDL_CHAIN)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    y, offs, mask = residual_norm(x_ptr, r_ptr, w_ptr, res_out_ptr, rows, R, N, eps, BLOCK_N)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _validate(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"add_rmsnorm: expected x [..., N] and weight [N], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if residual.shape != x.shape:
        raise ValueError(
            f"add_rmsnorm: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"add_rmsnorm: unsupported dtypes x={x.dtype}, weight={weight.dtype}")
    if residual.dtype != x.dtype:
        raise ValueError(f"add_rmsnorm: residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    if not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()):
        raise ValueError("add_rmsnorm: x, residual and weight must be contiguous")
    n = x.shape[-1]
    if n == 0 or n > MAX_N:
        raise ValueError(f"add_rmsnorm: last dim must be in [1, {MAX_N}], got {n}")
    check_device(x, residual, weight)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rmsnorm(x + residual) * weight, x + residual)`` in one kernel pass.

    ``x``, ``residual``: contiguous [..., N] of one float dtype; ``weight``: [N].
    The new residual is rounded to x.dtype before normalisation, like HF's eager code.
    """
    _validate(x, residual, weight)
    n = x.shape[-1]
    normed = torch.empty_like(x)
    new_residual = torch.empty_like(x)
    rows = x.numel() // n
    if rows == 0:
        return normed, new_residual
    block_r, block_n, warps = row_blocking(rows, n, 2 * x.element_size(), x.device)
    _add_rmsnorm_launch[(triton.cdiv(rows, block_r),)](
        x, residual, weight, normed, new_residual, rows, n, float(eps),
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, **pdl_opts(x),
    )
    return normed, new_residual


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference returning ``(normed, new_residual)`` as float32 tensors."""
    s = x.float() + residual.float()
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * h, s


_add_rmsnorm_launch = fast(_add_rmsnorm_kernel)  # launched through kernels.fastlaunch
