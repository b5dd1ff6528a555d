# Prefill GEMM: out = x @ w.T + bias (Hugging Face nn.Linear weight layout).
#
# Shapes:  x    [M, K]   any row stride, unit stride along K
#          w    [N, K]   row-major contiguous ([out_features, in_features])
#          bias [N]      contiguous, optional
#          out  [M, N]   new contiguous tensor, dtype of x
# Dtypes:  bf16 / fp16 / fp32 (x, w and bias all the same); fp32 accumulation.
#          fp32 inputs use "ieee" dot precision (no tf32) so results stay fp32-exact.
# Tiling:  one program per [BLOCK_M, BLOCK_N] output tile, K loop of BLOCK_K,
#          grouped (GROUP_M) program ordering so neighbouring programs share
#          w tiles in L2.  Autotuned on (M bucket, N, K, dtype) at first use
#          (KERNELS_AUTOTUNE=0 in the environment uses a fixed default instead).
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.tuning import bench_ms

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 4),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _default_config(dtype: torch.dtype) -> triton.Config:
    """Untimed config (KERNELS_AUTOTUNE=0 / interpreter) that fits shared memory for dtype."""
    if _INTERPRET:
        return _configs()[0]
    if dtype == torch.float32:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                             num_warps=4, num_stages=3)
    return triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                         num_warps=8, num_stages=4)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamp out-of-range rows onto valid ones: loads need no M/N mask, the store masks.
    x_ptrs = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn + offs_k[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_mask = offs_k[None, :] < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=k_mask, other=0.0)
            b = tl.load(w_ptrs, mask=k_mask, other=0.0)
        if UPCAST:  # the CPU interpreter multiplies bf16 as raw uint16 bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IS_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_gemm_tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"], do_bench=bench_ms)(
    triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gemm_kernel))
# (M bucket, N, K, dtype, has_bias) -> tuned config; later calls skip the autotuner's overhead
_TUNED: dict[tuple, triton.Config] = {}


def check_linear_inputs(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Validate shapes, dtypes, devices and strides shared by gemm and gemv."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x and w must be 2-D, got x{tuple(x.shape)} w{tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"K mismatch: x{tuple(x.shape)} vs w{tuple(w.shape)} ([N, K] layout)")
    if x.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {x.dtype}; expected bf16, fp16 or fp32")
    if w.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: x is {x.dtype}, w is {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"device mismatch: x on {x.device}, w on {w.device}")
    if x.shape[0] == 0 or x.shape[1] == 0 or w.shape[0] == 0:
        raise ValueError(f"empty operand: x{tuple(x.shape)} w{tuple(w.shape)}")
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along K (last dim)")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous row-major [N, K]")
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"dtype mismatch: bias is {bias.dtype}, x is {x.dtype}")
        if bias.device != x.device or not bias.is_contiguous():
            raise ValueError("bias must be contiguous and on the same device as x")


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled tensor-core GEMM for prefill: returns ``x @ w.T + bias`` as [M, N].

    x: [M, K] (unit stride along K), w: [N, K] contiguous, bias: [N] or None.
    All inputs share one dtype (bf16/fp16/fp32); accumulation is fp32 and the
    output has the input dtype.
    """
    check_linear_inputs(x, w, bias)
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    m_bucket = min(triton.next_power_of_2(M), 4096)

    args = (x, w, bias if bias is not None else w, out, M, N, K, m_bucket,
            x.stride(0), w.stride(0), out.stride(0))
    consts = dict(HAS_BIAS=bias is not None, IS_FP32=x.dtype == torch.float32,
                  UPCAST=_INTERPRET and x.dtype == torch.bfloat16)
    key = (m_bucket, N, K, x.dtype, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is None and (_INTERPRET or os.environ.get("KERNELS_AUTOTUNE", "1") == "0"):
        cfg = _TUNED[key] = _default_config(x.dtype)
    if cfg is None:
        _gemm_tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
            *args, **consts)
        _TUNED[key] = _gemm_tuned.best_config
    else:
        kw = cfg.kwargs
        grid = (triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **consts, **kw, EVEN_K=K % kw["BLOCK_K"] == 0,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gemm_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`gemm` (returns float32)."""
    out = x.float() @ w.float().T
    if bias is not None:
        out = out + bias.float()
    return out
