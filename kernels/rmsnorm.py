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
# Grid:    one program per row; a row of up to MAX_N elements is held in registers.
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.checks import check_device

MAX_N = 65536
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, out_ptr,
    S1, S2,  # sizes of the 2nd and 3rd (padded) leading dims
    sx0, sx1, sx2,  # strides of the 3 (padded) leading dims of x
    N, eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i2 = row % S2
    i1 = (row // S2) % S1
    i0 = row // (S2 * S1)
    x_row = x_ptr + i0 * sx0 + i1 * sx1 + i2 * sx2
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    out_ty = out_ptr.dtype.element_ty
    h = (x * rstd).to(out_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (h * w).to(out_ty), mask=mask)


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
    while len(sizes) < 3:
        sizes.insert(0, 1)
        strides.insert(0, 0)
    return sizes, strides


def _num_warps(block: int) -> int:
    if block <= 1024:
        return 4
    return 8 if block <= 4096 else 16


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
    sizes, strides = _leading_layout(x)
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(rows,)](
        x, weight, out, sizes[1], sizes[2], strides[0], strides[1], strides[2],
        n, float(eps), BLOCK_N=block, num_warps=_num_warps(block),
    )
    return out


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 reference: ``weight * x * rsqrt(mean(x^2, -1) + eps)``, returned as float32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * h
