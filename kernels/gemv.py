# Decode GEMV / skinny GEMM: out = x @ w.T + bias for M = 1..64 token rows.
#
# Shapes:  x    [M, K]   any row stride, unit stride along K (M <= 64)
#          w    [N, K]   row-major contiguous ([out_features, in_features])
#          bias [N]      contiguous, optional
#          out  [M, N]   new contiguous tensor, dtype of x
#          ws   [SPLIT_K, M, N] fp32 partial sums (only when SPLIT_K > 1)
# Dtypes:  bf16 / fp16 / fp32 (all the same); fp32 accumulation.
# Scheme:  memory-bound on w.  Program (n, s) owns BLOCK_N rows of w and the
#          s-th of SPLIT_K slices of K, and streams that part of w exactly once
#          (16-byte vector loads, evict-first) while all M rows of x are
#          re-read from L2/L1.
#          M == 1: CUDA-core FMAs into a [BLOCK_N, BLOCK_K] fp32 register tile,
#                  reduced over K once after the loop.
#          M >= 2: x padded to BLOCK_M = max(16, next_pow2(M)) rows (tail rows
#                  re-read row M-1), tensor-core tl.dot, one of two operand orders:
#                  SWAP_AB=0: acc[BLOCK_M, BLOCK_N] = x @ w_tile.T (tokens are the
#                             MMA's M; Hopper falls back to mma.sync at M = 16)
#                  SWAP_AB=1: acc[BLOCK_N, BLOCK_M] = w_tile @ x.T (BLOCK_N = 64/128
#                             weight rows are the MMA's M, wgmma-eligible on
#                             Hopper), transposed in registers before the store.
#          SPLIT_K > 1 adds parallelism for small N; the last program of each N
#          block to finish (kernels/tickets.py) sums the fp32 partials, adds the
#          bias and casts; a second kernel does it where the tuned config has no
#          TICKET, or the counters would have to be allocated inside a CUDA-graph
#          capture (on the H100 the ticket beat the second kernel by 0.4-0.5 us).  The config (SWAP_AB,
#          BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) is tuned per (M bucket, N,
#          K, dtype, bias) on first use over both operand orders, timing both
#          kernels together replayed from a CUDA graph, as decode steps run (eager
#          timing charged split-K its second launch), after an L2 flush where the
#          weight could stay in the L2 (kernels.tuning); KERNELS_AUTOTUNE=0 skips the
#          timing and uses a fixed default; the interpreter uses one config.
#          fp32 dots use input_precision="ieee"; under the CPU interpreter bf16
#          tiles are upcast first (UPCAST: it multiplies bf16 as raw bits).
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kernels import tuning_cache
from kernels.gemm import check_linear_inputs
from kernels.mma import mma_nt
from kernels.split_k import reduce_split_k, split_k_scratch, store_split_k
from kernels.tuning import fastest, fits_l2, graph_ms, like_rows, tuning_suspended
from kernels.fastlaunch import fast
from kernels.pdl import enter as pdl_enter, opts as pdl_opts

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
_FMA_SHAPES = [(8, 512, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 1), (4, 1024, 4, 1), (16, 1024, 8, 1)]
_DOT_SHAPES = [(16, 256, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3)]
# swap-AB: BLOCK_N weight rows are the MMA's M (64 per warpgroup for Hopper wgmma)
_SWAP_SHAPES = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 5), (128, 128, 8, 4),
                (128, 256, 8, 3)]
_SPLITS = (1, 2, 4, 8)
_SMEM_BYTES = 227 * 1024  # largest opt-in shared memory per block (H100/H200)


def _cfg(bn: int, bk: int, sk: int, swap: bool, warps: int = 4, stages: int = 1,
         ticket: bool = False) -> triton.Config:
    """One launch config; SWAP_AB only matters for M >= 2, TICKET (split-K partials summed by
    the last program of each N block instead of a second kernel) for SPLIT_K > 1."""
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "SWAP_AB": swap, "TICKET": ticket},
                         num_warps=warps, num_stages=stages)


# used without timing when KERNELS_AUTOTUNE=0 (fits shared memory for every dtype)
# (the interpreter runs each program in Python: there fewer, wider ones, as its tuning candidate)
_DEFAULT_FMA = _cfg(64, 64, 1, False) if _INTERPRET else _cfg(8, 512, 1, False)
_DEFAULT_DOT = _cfg(64, 64, 1, False) if _INTERPRET else _cfg(32, 128, 1, False, stages=2)


@triton.jit
def _load_tiles(w_ptrs, x_ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    """Load one [BLOCK_N, BLOCK_K] tile of w and the matching x tile."""
    if EVEN_K:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs, eviction_policy="evict_last")
    else:
        k_mask = offs_k[None, :] < k_left
        w = tl.load(w_ptrs, mask=k_mask, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=k_mask, other=0.0, eviction_policy="evict_last")
    return w, x


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, TICKET: tl.constexpr,
    PDL_CHAIN: tl.constexpr = False,
):
    pdl_enter(PDL_CHAIN)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_k, SPLIT_K)
    kb_lo = tl.program_id(1) * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_k)
    rows_w = tl.minimum(offs_n, N - 1)  # the tail block reads the last row again (no division); the store masks it
    w_ptrs = w_ptr + rows_w[:, None].to(tl.int64) * stride_wn + (kb_lo * BLOCK_K + offs_k)[None, :]
    rows_x = tl.minimum(offs_m, M - 1)
    x_ptrs = x_ptr + rows_x[:, None].to(tl.int64) * stride_xm + (kb_lo * BLOCK_K + offs_k)[None, :]

    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            w, x = _load_tiles(w_ptrs, x_ptrs, offs_k, K - kb * BLOCK_K, EVEN_K)
            acc2 += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.sum(acc2, axis=1)[None, :]
    elif SWAP_AB:  # weight rows are the MMA's M dimension, token rows its N
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            w, x = _load_tiles(w_ptrs, x_ptrs, offs_k, K - kb * BLOCK_K, EVEN_K)
            acc_t = mma_nt(w, x, acc_t, IS_FP32, UPCAST)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            w, x = _load_tiles(w_ptrs, x_ptrs, offs_k, K - kb * BLOCK_K, EVEN_K)
            acc = mma_nt(x, w, acc, IS_FP32, UPCAST)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K

    store_split_k(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, rows_w, M, N, stride_om,
                  HAS_BIAS, SPLIT_K, TICKET, BLOCK_M, BLOCK_N)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _candidates(block_m: int, N: int, K: int, esize: int, sms: int) -> list[triton.Config]:
    """Configs worth timing for this shape (a single one under the interpreter).

    M >= 2 times both operand orders.  Split-K is kept only where it adds
    parallelism the grid lacks (<= 6 programs per SM, >= 2 K blocks per
    split); tiles whose pipeline cannot fit shared memory are dropped.
    """
    if _INTERPRET:
        return [_cfg(64, 64, 2 if K >= 128 else 1, False)]  # interpreted: fewer, wider programs
    shapes = [(s, False) for s in _FMA_SHAPES] if block_m == 1 else \
        [(s, False) for s in _DOT_SHAPES] + [(s, True) for s in _SWAP_SHAPES]
    out = []
    for (bn, bk, warps, stages), swap in shapes:
        if (stages - 1) * (bn + block_m) * bk * esize > _SMEM_BYTES:  # can't fit: skip the compile
            continue
        for sk in _SPLITS:
            if sk > 1 and (triton.cdiv(N, bn) * sk > 6 * sms or triton.cdiv(K, bk) < 2 * sk):
                continue
            out.append(_cfg(bn, bk, sk, swap, warps, stages, ticket=sk > 1))
    return out


def _launch(cfg: triton.Config, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
            out: torch.Tensor, block_m: int) -> None:
    (M, K), N = x.shape, w.shape[0]
    bn, bk, sk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.kwargs["SPLIT_K"]
    ws, cnt = split_k_scratch(cfg, out, "gemv")
    b = bias if bias is not None else w
    grid_n = triton.cdiv(N, bn)
    _gemv_launch[(grid_n, sk)](
        x, w, b, out, ws, out if cnt is None else cnt, M, N, K, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IS_FP32=x.dtype == torch.float32,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=block_m,
        BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, EVEN_K=K % bk == 0,
        SWAP_AB=cfg.kwargs.get("SWAP_AB", False), TICKET=cnt is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_opts(out))
    reduce_split_k(ws, cnt, bias, out)


def _pick(cands: list[triton.Config], run: Callable[[triton.Config], None], cold: bool = False,
          device: torch.device | None = None) -> triton.Config:
    """Time every candidate (both kernels) and return the fastest; decode steps replay as CUDA
    graphs, so the timing does too (no launch overhead). cold: a weight that fits the L2 is
    read from HBM in each timed call, as a decode step reads it (kernels.tuning.graph_ms).
    device: compile the candidates in parallel first (kernels.tuning.precompile)."""
    return fastest(cands, run, functools.partial(graph_ms, cold=cold), name="gemv", device=device)


# (M bucket, N, K, dtype, has_bias) -> tuned config
_TUNED: dict[tuple, triton.Config] = {}


def _tuned(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor, block_m: int) -> triton.Config:
    """The cached config for this shape; the first call tunes it (timing into out)."""
    (_, K), N = x.shape, w.shape[0]
    key = (block_m, N, K, x.dtype, bias is not None)
    cfg = _TUNED.get(key)
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 1
    if cfg is None and (tuning_suspended() or x.is_cuda and torch.cuda.is_current_stream_capturing()):
        # untimed (a capture, untuned()): a cached or shipped pick (picks_like: the whole's), else the default
        like = like_rows()
        if like is not None and like != N:  # the whole's pick: its kernel is built already
            key = (block_m, like, K, x.dtype, bias is not None)
            if key in _TUNED:
                return _TUNED[key]
        cands = lambda: _candidates(block_m, key[1], K, x.element_size(), sms)  # noqa: E731
        return tuning_cache.untimed_pick(x.device, "gemv", key, cands, _DEFAULT_FMA if block_m == 1 else _DEFAULT_DOT)
    if cfg is None:
        cands = _candidates(block_m, N, K, x.element_size(), sms)
        if os.environ.get("KERNELS_AUTOTUNE", "1") == "0" and len(cands) > 1:
            cands = [_DEFAULT_FMA if block_m == 1 else _DEFAULT_DOT]
        cold = fits_l2(w.nbytes, w.device)
        tune = functools.partial(_pick, cands, lambda c: _launch(c, x, w, bias, out, block_m), cold, x.device)
        cfg = _TUNED[key] = tuning_cache.tuned(x.device, "gemv", key, cands, tune) or \
            (_DEFAULT_FMA if block_m == 1 else _DEFAULT_DOT)  # disk, else timed (default: the tuning failed)
    return cfg


def _gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
          cfg: triton.Config | None) -> torch.Tensor:
    """:func:`gemv` with an optional pinned launch config (tests force each path with it)."""
    check_linear_inputs(x, w, bias)
    M = x.shape[0]
    if M > 64:
        raise ValueError(f"gemv supports at most 64 rows, got M={M}; use gemm")
    out = torch.empty((M, w.shape[0]), device=x.device, dtype=x.dtype)
    block_m = 1 if M == 1 else max(16, triton.next_power_of_2(M))
    _launch(cfg or _tuned(x, w, bias, out, block_m), x, w, bias, out, block_m)
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-streaming matmul for decode: returns ``x @ w.T + bias`` as [M, N].

    x: [M, K] with M in 1..64 (unit stride along K), w: [N, K] contiguous,
    bias: [N] or None.  Same dtype everywhere (bf16/fp16/fp32), fp32
    accumulation, output in the input dtype.  Each weight element is read once.
    The first call for a new (M bucket, N, K, dtype, bias) tunes the launch
    config over both tensor-core operand orders (M >= 2).
    """
    return _gemv(x, w, bias, None)


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`gemv` (returns float32)."""
    out = x.float() @ w.float().T
    if bias is not None:
        out = out + bias.float()
    return out


_gemv_launch = fast(_gemv_kernel)  # launched through kernels.fastlaunch
