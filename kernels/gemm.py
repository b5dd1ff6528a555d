# Prefill GEMM: out = x @ w.T + bias (Hugging Face nn.Linear weight layout).
#
# Shapes:  x    [M, K]   any row stride, unit stride along K
#          w    [N, K]   row-major, unit stride along K, any row stride (a column slice of a wider weight)
#          bias [N]      contiguous, optional
#          out  [M, N]   new contiguous tensor, dtype of x (or the caller's: unit stride along N)
#          acc  [M, N]   optional, any float dtype, unit stride along N: out = x @ w.T + bias + acc (acc may be
#                        out itself: each element is read by the program that then writes it)
# Dtypes:  bf16 / fp16 / fp32 (x, w and bias all the same); fp32 accumulation.
#          fp32 inputs use "ieee" dot precision (no tf32) so results stay fp32-exact.
# Kernels: two families behind one entry point:
#          pointer (here): one program per [BLOCK_M, BLOCK_N] output tile, K loop of
#            BLOCK_K with pointer loads (rows clamped by % M / % N, so only the K tail
#            and the store are masked), grouped (GROUP_M) program ordering so
#            neighbouring programs share w tiles in L2.
#          TMA (kernels/gemm_tma.py): tensor-descriptor loads / stores and a
#            persistent tile loop; CUDA capability >= 9 with 16-byte aligned x / w
#            base pointers and row strides only (checked on the host).
# Tuning:  per (M bucket, N, K, dtype, bias) at first use, kernels.tuning.fastest times
#          the pointer configs and, where the TMA family may run, its configs too (<= 16
#          in all) as CUDA-graph replays, cold (graph_ms) where w fits the L2, as a
#          prefill pass reads each weight once; a candidate whose output
#          disagrees with the first candidate's is never kept.  Calls with operands
#          not TMA-aligned on a TMA-capable device are tuned under their own key,
#          over the pointer family.  KERNELS_AUTOTUNE=0 in the environment and the
#          CPU interpreter use a fixed pointer default instead.
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kernels import gemm_tma, tuning_cache
from kernels.mma import mma_nt
from kernels.tuning import fastest, fits_l2, graph_ms, tuning_suspended
from kernels.fastlaunch import fast

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4})]  # fewer programs
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
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order (also kernels/qgemm.py's): GROUP_M row blocks
    walk the N blocks together, so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, acc_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_am,
    HAS_BIAS: tl.constexpr, HAS_ACC: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

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
        acc = mma_nt(a, b, acc, IS_FP32, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_ACC:  # a running sum (e.g. the K chunks of a chunked MLP's down projection), read before out is written
        acc += tl.load(acc_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :], mask=out_mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _candidates(x: torch.Tensor, tma_ok: bool) -> list[triton.Config]:
    """Configs to time for this call: the pointer family, plus the TMA family where it may run."""
    if _INTERPRET or os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
        return [_default_config(x.dtype)]
    return _configs() + (gemm_tma.candidates(x.element_size()) if tma_ok else [])


def _pick(cands: list[triton.Config], run: Callable[[triton.Config], None], out: torch.Tensor,
          cold: bool = False) -> triton.Config:
    """Time every candidate (writing into out); return the fastest whose output agrees with the first's.

    Timed warm and eager (bench_ms), three fresh picks for the 7B's qkv and o projections at
    2048 tokens ran up to 10% and 13% slower on rotating weights than the best candidate
    (bench/probe_gemm_pick.py, H100 run 11); timed cold in graphs, they ran 111-114 and
    78-82 us against best candidates of 114 and 81 us in the same probe."""
    ref: list[torch.Tensor] = []

    def agrees(_cfg: triton.Config) -> bool:
        probe = torch.nan_to_num(out[::_PROBE[0], ::_PROBE[1]].float())
        if not ref:
            ref.append(probe)
        return bool((probe - ref[0]).norm() <= _AGREE * ref[0].norm())  # else a miscompile: never pick it

    timer = functools.partial(graph_ms, cold=cold)
    return fastest(cands, run, timer, accept=agrees, name="gemm", device=out.device)


# (M bucket, N, K, dtype, has_bias[, "pointer"]) -> tuned config; "pointer" marks calls on a
# TMA-capable device whose operands are not TMA-aligned (tuned over the pointer family only)
_TUNED: dict[tuple, triton.Config] = {}
_PROBE = (13, 11)  # output rows / columns sampled to compare candidates (strides coprime to tiles)
_AGREE = 1e-2  # relative Frobenius distance allowed between two candidates' outputs


def _tuned(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           tma_ok: bool, summed: bool = False) -> triton.Config:
    """The cached config for this call; the first call of a key tunes it (timing into out, or with ``summed``,
    a call adding a running sum, into an fp32 scratch: never into the sum, and with the pointer-stored epilogue
    such launches run, gemm_tma.launch)."""
    (M, K), N = x.shape, w.shape[0]
    key = (min(triton.next_power_of_2(M), 4096), N, K, x.dtype, bias is not None)
    if not tma_ok and gemm_tma.device_ok(x):
        key += ("pointer",)
    cfg = _TUNED.get(key)
    if cfg is None and tuning_suspended():  # untimed: a cached or shipped pick, else the default; not kept
        return tuning_cache.untimed_pick(x.device, "gemm", key, lambda: _candidates(x, tma_ok),
                                         _default_config(x.dtype))
    if cfg is None:
        cands = _candidates(x, tma_ok)
        out = torch.empty_like(out, dtype=torch.float32) if summed else out
        tune = functools.partial(_pick, cands, lambda c: _launch(c, x, w, bias, out), out,
                                 fits_l2(w.nbytes, w.device))
        cfg = _TUNED[key] = tuning_cache.tuned(x.device, "gemm", key, cands, tune) or _default_config(x.dtype)
    return cfg


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
    if w.stride(1) != 1 or w.stride(0) < w.shape[1]:
        raise ValueError(f"w must be row-major [N, K] with unit stride along K (any row stride: a column slice of a "
                         f"wider weight), got strides {w.stride()}")
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"dtype mismatch: bias is {bias.dtype}, x is {x.dtype}")
        if bias.device != x.device or not bias.is_contiguous():
            raise ValueError("bias must be contiguous and on the same device as x")


def _launch(cfg: triton.Config, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, acc: torch.Tensor | None = None) -> None:
    """Run one config (either family) into out (plus ``acc`` where given)."""
    if cfg.kwargs.get("TMA"):
        gemm_tma.launch(cfg, x, w, bias, out, acc)
        return
    (M, K), N = x.shape, w.shape[0]
    kw = cfg.kwargs
    grid = (triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]),)
    _gemm_launch[grid](
        x, w, bias if bias is not None else w, out, out if acc is None else acc, M, N, K,
        x.stride(0), w.stride(0), out.stride(0), out.stride(0) if acc is None else acc.stride(0),
        HAS_BIAS=bias is not None, HAS_ACC=acc is not None, IS_FP32=x.dtype == torch.float32,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=kw["BLOCK_M"], BLOCK_N=kw["BLOCK_N"], BLOCK_K=kw["BLOCK_K"], GROUP_M=kw["GROUP_M"],
        EVEN_K=K % kw["BLOCK_K"] == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def check_out(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, fp32_ok: bool = False) -> None:
    """A caller's output: [M, N] in x's dtype (or fp32 where ``fp32_ok``: a GEMM's running sum) and device,
    unit stride along N (any row stride, e.g. a column slice of a wider output)."""
    dtype_ok = out.dtype == x.dtype or (fp32_ok and out.dtype == torch.float32)
    if out.shape != (x.shape[0], w.shape[0]) or not dtype_ok or out.device != x.device:
        raise ValueError(f"out must be [{x.shape[0]}, {w.shape[0]}] {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(1) != 1 or out.stride(0) < out.shape[1]:
        raise ValueError(f"out must have unit stride along N and rows that do not overlap, got strides {out.stride()}")


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
          cfg: triton.Config | None, out: torch.Tensor | None = None,
          acc: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gemm` with an optional pinned launch config (tests force each family with it)."""
    check_linear_inputs(x, w, bias)
    if out is None:
        out = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)
    else:
        check_out(x, w, out, fp32_ok=True)
    if acc is not None:
        check_acc(out, acc)
    tma_ok = gemm_tma.eligible(x, w, out)
    if cfg is not None and cfg.kwargs.get("TMA") and not tma_ok:
        raise ValueError("a TMA config needs capability >= 9 (or the interpreter) and 16-byte "
                         "aligned x / w base pointers and row strides")
    if cfg is None:
        cfg = _tuned(x, w, bias, out, tma_ok, summed=acc is not None)
    _launch(cfg, x, w, bias, out, acc)
    return out


def check_acc(out: torch.Tensor, acc: torch.Tensor) -> None:
    """A running sum added into a GEMM's output: out's shape and device, a float dtype, unit stride along N,
    and either out itself or memory apart from it."""
    if acc.shape != out.shape or acc.device != out.device or acc.dtype not in _DTYPES:
        raise ValueError(f"acc must be a float [{out.shape[0]}, {out.shape[1]}] tensor on {out.device}, got "
                         f"{acc.dtype} {tuple(acc.shape)} on {acc.device}")
    if acc.stride(1) != 1 or acc.stride(0) < acc.shape[1]:
        raise ValueError(f"acc must have unit stride along N and rows that do not overlap, got {acc.stride()}")
    same = acc.data_ptr() == out.data_ptr() and acc.stride() == out.stride() and acc.dtype == out.dtype
    if not same:
        a0, a1 = acc.data_ptr(), acc.data_ptr() + acc.stride(0) * acc.shape[0] * acc.element_size()
        o0, o1 = out.data_ptr(), out.data_ptr() + out.stride(0) * out.shape[0] * out.element_size()
        if a0 < o1 and o0 < a1:
            raise ValueError("acc must be out itself or not overlap it (another program may write it first)")


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled tensor-core GEMM for prefill: returns ``x @ w.T + bias`` as [M, N] (written into ``out`` when
    given: [M, N], unit stride along N, any row stride, e.g. a column slice of a wider output).

    x: [M, K] (unit stride along K), w: [N, K] (unit stride along K), bias: [N] or None.
    All inputs share one dtype (bf16/fp16/fp32); accumulation is fp32 and the
    output has the input dtype (a caller's ``out`` may be fp32: a running sum). ``acc`` [M, N] (any float
    dtype, may be ``out`` itself) is added to the product: a K-chunked product summed chunk by chunk.  The first call of a new (M bucket, N, K, dtype,
    bias) times the pointer kernel's and (Hopper+, aligned operands) the TMA
    kernel's configs and keeps the fastest.
    """
    return _gemm(x, w, bias, None, out, acc)


def gemm_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`gemm` (returns float32)."""
    out = x.float() @ w.float().T
    if bias is not None:
        out = out + bias.float()
    return out


_gemm_launch = fast(_gemm_kernel)  # launched through kernels.fastlaunch
