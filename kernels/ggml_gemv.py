# Decode GEMV on ggml blocks: out = x @ dequant(blocks).T + bias for M = 1..64 token rows, reading
# GGUF's own Q4_K / Q5_K / Q6_K or Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 bytes (no repacking; layouts:
# kernels/ggml_blocks.py).
#
# Shapes:  x       [M, K]  bf16 / fp16 / fp32, unit stride along K, any row stride, 1 <= M <= 64
#          blocks  uint8 [N, K/256 * bytes] (K-quants) or [N, K/32 * bytes] (legacy types: K any
#                  multiple of 32)  GGUF tensor rows, contiguous, 2-byte aligned
#          bias    [N]     x's dtype, optional
#          out     [M, N]  x's dtype, unit stride along N, any row stride (a column slice of a wider
#                          output is fine: columns outside [0, N) are never written)
# Scheme:  memory-bound on the block bytes, as llama.cpp's mmvq.  Program n owns BLOCK_N weight rows
#          and loops over the K / 256 super-blocks (legacy types: steps of 8 blocks of 32, the last
#          one masked), reading each block's bytes once (evict-first) and decoding codes in
#          registers (kernels/ggml_common.py).
#          FMA path (M == 1, and fp32 x at any M): CUDA-core FMAs, program (n, m) takes row m of x.
#          No value is dequantized: per sub-block the program forms sum(q * x) and sum(x) and
#          applies the scale and min once (Q4_K / Q5_K: d sc sum(q x) - dmin m sum(x); Q6_K:
#          d sc (sum(q x) - 32 sum(x)); legacy: d sum((q - offset) x) [+ m sum(x)]).  For M > 1
#          the block bytes are re-read per row (from L2).
#          Dot path (bf16 / fp16 x, M >= 2): the tile is dequantized once in fp32, cast to x's dtype
#          and fed to tensor-core tl.dot with x padded to BLOCK_M = max(16, next_pow2(M)) rows
#          (kernels/mma.py), so the block bytes are read once for all rows.  (fp32 x stays on the FMA
#          path: sm_90 ptxas spills 5.3 KB a thread for Q4_K's ieee fp32 dots at BLOCK_N 32.)
# Tuning:  fixed guesses, no autotuning yet, picked only so that sm_90 ptxas spills nothing
#          (tests/test_kernels_ggml.py compiles every config on the CPU): FMA BLOCK_N 16 / 8 warps
#          (Q4_K / Q6_K 64 registers, 4 warps: 128; Q5_K 101, so 2 programs an SM instead of 4), dot
#          BLOCK_N 16 / 8 warps (166-210 registers at BLOCK_M 16..64; BLOCK_N 32 spilled 8-72 bytes at
#          some BLOCK_M).  Legacy types, same BLOCK_N / warps: FMA 73-99 registers, dot 126-179 at
#          BLOCK_M 16, 202-255 at BLOCK_M 64 (no spill; one 256-thread program an SM, as the K-quants'
#          189).  Speed is unmeasured.  ggml_gemv(config=...) overrides BLOCK_N / num_warps /
#          num_stages and can split K (SPLIT_K programs per tile take every SPLIT_K-th step and add
#          fp32 partials atomically; bias and rounding follow) for bench/probe_qkernels.py
#          --ggml-sweep and the tests; the engine passes none.  To tune on the
#          GPU: BLOCK_N (8..64) and num_warps (2..8) per (qtype, M bucket, N, K); split-K for grids
#          with fewer programs than ~4x the SMs (small N); prefetching the next super-block (Triton's
#          pipeliner issues no cp.async for these byte loads even with tl.range num_stages: loading
#          Q4_K's 144-byte blocks as 32-bit words may let it); loading each Q6_K byte once (q6k_run
#          reads ql twice and qh four times per super-block, from L1; q4k_tile reads Q5_K's qh 4 times).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import ggml_tuned
from kernels.checks import check_device
from kernels.ggml_blocks import BLOCKS, dequant_ref
from kernels.ggml_common import (INTERPRET, check_blocks, check_out, layout_meta, legacy_bases, legacy_cols,
                                 legacy_min, legacy_tile, q4k_cols, q4k_tile, q6k_cols, q6k_run, to_out)
from kernels.mma import mma_nt

GGML_GEMV_MAX_M = 64
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# the interpreter runs each program in Python: fewer, wider ones (still several for the tests' N of 40+)
_FMA_BLOCK_N, _FMA_WARPS = 32 if INTERPRET else 16, 8
_DOT_BLOCK_N, _DOT_WARPS = 32 if INTERPRET else 16, 8
_CONFIG_KEYS = frozenset({"BLOCK_N", "num_warps", "num_stages", "SPLIT_K", "maxnreg"})


@triton.jit
def _x_tile(x_ptr, rows_m, M, stride_xm, cols, USE_DOT: tl.constexpr):
    """x at columns ``cols`` ([A, B] offsets from the super-block start): fp32 [A, B] of the row at
    x_ptr (FMA path), or [BLOCK_M, A * B] in x's dtype (rows past M read 0) for the dots."""
    if USE_DOT:  # one return statement: Triton types every return of a function alike
        flat = tl.reshape(cols, (cols.shape[0] * cols.shape[1],))
        xt = tl.load(x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + flat[None, :],
                     mask=rows_m[:, None] < M, other=0.0, eviction_policy="evict_last")
    else:
        xt = tl.load(x_ptr + cols, eviction_policy="evict_last").to(tl.float32)
    return xt


@triton.jit
def _w_dot(acc, xt, w, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt @ w.T for a dequantized fp32 tile w [BLOCK_N, A, B] (cast to x's dtype first)."""
    w2 = tl.reshape(w, (w.shape[0], w.shape[1] * w.shape[2])).to(xt.dtype)
    return mma_nt(xt, w2, acc, IS_FP32, UPCAST)


@triton.jit
def _q4k_step(acc, blk, h, base, x_ptr, rows_m, M, stride_xm, Q5: tl.constexpr,
              USE_DOT: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc plus one Q4_K (Q5: Q5_K) super-block's contribution (x_ptr at the super-block's first column)."""
    lo, hi, s_lo, s_hi, m_lo, m_hi = q4k_tile(blk, h, base, Q5)
    cols = q4k_cols()
    x_lo = _x_tile(x_ptr, rows_m, M, stride_xm, cols, USE_DOT)
    x_hi = _x_tile(x_ptr, rows_m, M, stride_xm, cols + 32, USE_DOT)
    if USE_DOT:
        acc = _w_dot(acc, x_lo, s_lo[:, :, None] * lo - m_lo[:, :, None], IS_FP32, UPCAST)
        acc = _w_dot(acc, x_hi, s_hi[:, :, None] * hi - m_hi[:, :, None], IS_FP32, UPCAST)
    else:
        qx = s_lo * tl.sum(lo * x_lo[None, :, :], axis=2) + s_hi * tl.sum(hi * x_hi[None, :, :], axis=2)
        mx = m_lo * tl.sum(x_lo, axis=1)[None, :] + m_hi * tl.sum(x_hi, axis=1)[None, :]
        acc += tl.sum(qx - mx, axis=1)
    return acc


@triton.jit
def _q6k_step(acc, blk, h, base, x_ptr, rows_m, M, stride_xm,
              USE_DOT: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc plus one Q6_K super-block's contribution (x_ptr at the super-block's first column)."""
    for r in tl.static_range(4):
        q, s = q6k_run(blk, h, base, r)
        xt = _x_tile(x_ptr, rows_m, M, stride_xm, q6k_cols(r), USE_DOT)
        if USE_DOT:
            acc = _w_dot(acc, xt, s[:, :, None] * (q - 32.0), IS_FP32, UPCAST)
        else:
            acc += tl.sum(s * (tl.sum(q * xt[None, :, :], axis=2) - 32.0 * tl.sum(xt, axis=1)[None, :]), axis=1)
    return acc


@triton.jit
def _legacy_step(acc, blk, h, base, left, x_ptr, rows_m, M, stride_xm, QS: tl.constexpr, QH: tl.constexpr,
                 BITS: tl.constexpr, MINS: tl.constexpr, OFFSET: tl.constexpr,
                 USE_DOT: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc plus the contribution of NB legacy blocks, of which ``left`` or more remain in the row (x_ptr
    at the step's first column; blocks past the row read x as 0 and weigh 0)."""
    live = tl.arange(0, 8) < left
    lo, hi, d = legacy_tile(blk, h, base, live, QS, QH, BITS, OFFSET)
    cols = legacy_cols()
    if USE_DOT:
        flat = tl.reshape(cols, (cols.shape[0] * cols.shape[1],))
        keep = (rows_m[:, None] < M) & (flat < 32 * left)[None, :]
        x_rows = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm
        x_lo = tl.load(x_rows + flat[None, :], mask=keep, other=0.0, eviction_policy="evict_last")
        x_hi = tl.load(x_rows + 16 + flat[None, :], mask=keep, other=0.0, eviction_policy="evict_last")
        w_lo = d[:, :, None] * lo
        w_hi = d[:, :, None] * hi
        if MINS:
            m = legacy_min(h, base, live)[:, :, None]
            w_lo += m
            w_hi += m
        acc = _w_dot(acc, x_lo, w_lo, IS_FP32, UPCAST)
        acc = _w_dot(acc, x_hi, w_hi, IS_FP32, UPCAST)
    else:
        x_lo = tl.load(x_ptr + cols, mask=live[:, None], other=0.0, eviction_policy="evict_last").to(tl.float32)
        x_hi = tl.load(x_ptr + 16 + cols, mask=live[:, None], other=0.0, eviction_policy="evict_last").to(tl.float32)
        qx = d * (tl.sum(lo * x_lo[None, :, :], axis=2) + tl.sum(hi * x_hi[None, :, :], axis=2))
        if MINS:
            qx += legacy_min(h, base, live) * (tl.sum(x_lo, axis=1) + tl.sum(x_hi, axis=1))[None, :]
        acc += tl.sum(qx, axis=1)
    return acc


@triton.jit
def _ggml_gemv_kernel(x_ptr, blk, h, bias_ptr, out_ptr, M, N, n_blocks, row_bytes, stride_xm, stride_om,
                      Q5: tl.constexpr, Q6: tl.constexpr, BLOCK_BYTES: tl.constexpr, LEGACY: tl.constexpr,
                      QS: tl.constexpr, QH: tl.constexpr, BITS: tl.constexpr, MINS: tl.constexpr,
                      OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                      USE_DOT: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr, RNE_BF16: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT_K > 1:  # program (n, m, s) takes steps s, s + SPLIT_K, ... and adds fp32 partials to out
        s0 = tl.program_id(2)
    else:
        s0 = 0
    if not USE_DOT:  # FMA path: program (n, m) takes row m of x
        x_ptr += tl.program_id(1).to(tl.int64) * stride_xm
        out_ptr += tl.program_id(1).to(tl.int64) * stride_om
    row_off = tl.minimum(rows, N - 1).to(tl.int64) * row_bytes  # tail rows re-read row N - 1, never stored
    rows_m = tl.arange(0, BLOCK_M)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if LEGACY:  # n_blocks blocks of 32 a row, NB = 8 a step
        for sb in range(s0, tl.cdiv(n_blocks, 8), SPLIT_K):
            acc = _legacy_step(acc, blk, h, legacy_bases(row_off, sb, BLOCK_BYTES), n_blocks - sb * 8,
                               x_ptr + sb * 256, rows_m, M, stride_xm,
                               QS, QH, BITS, MINS, OFFSET, USE_DOT, IS_FP32, UPCAST)
    else:
        for sb in range(s0, n_blocks, SPLIT_K):  # K-quant super-blocks
            base = row_off + sb * BLOCK_BYTES
            if Q6:
                acc = _q6k_step(acc, blk, h, base, x_ptr + sb * 256, rows_m, M, stride_xm, USE_DOT, IS_FP32, UPCAST)
            else:
                acc = _q4k_step(acc, blk, h, base, x_ptr + sb * 256, rows_m, M, stride_xm, Q5, USE_DOT, IS_FP32,
                                UPCAST)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dt = out_ptr.dtype.element_ty
    if USE_DOT:
        o = out_ptr + rows_m[:, None].to(tl.int64) * stride_om + rows[None, :]
        keep = (rows_m[:, None] < M) & (rows[None, :] < N)
        if SPLIT_K > 1:  # out: a zeroed fp32 workspace; bias and rounding come after (the launcher)
            tl.atomic_add(o, acc, mask=keep, sem="relaxed")
        else:
            tl.store(o, to_out(acc + b[None, :], dt, RNE_BF16), mask=keep)
    elif SPLIT_K > 1:
        tl.atomic_add(out_ptr + rows, acc, mask=rows < N, sem="relaxed")
    else:
        tl.store(out_ptr + rows, to_out(acc + b, dt, RNE_BF16), mask=rows < N)


def _check(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None) -> torch.Tensor:
    """Validate x, blocks and bias; returns the blocks' fp16 view."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"unsupported x dtype {x.dtype}; expected bf16, fp16 or fp32")
    M, K = x.shape
    if not 1 <= M <= GGML_GEMV_MAX_M:
        raise ValueError(f"ggml_gemv takes 1..{GGML_GEMV_MAX_M} rows of x, got M={M}; for more rows "
                         "widen the weight with kernels.ggml_dequant and run a dense GEMM")
    if x.stride(1) != 1:
        raise ValueError(f"x must have unit stride along K, got strides {x.stride()}")
    h = check_blocks(blocks, qtype, K)
    if bias is not None and (bias.shape != (blocks.shape[0],) or bias.dtype != x.dtype or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous {x.dtype} [N={blocks.shape[0]}], "
                         f"got {bias.dtype} {tuple(bias.shape)} strides {bias.stride()}")
    check_device(x, blocks, *([] if bias is None else [bias]))
    return h


def check_config(config: dict[str, int]) -> dict[str, int]:
    """Validate a launch override for :func:`ggml_gemv` (probes and tests): BLOCK_N (8..128, a power of
    two), num_warps (1, 2, 4, 8, 16), num_stages (1..8), SPLIT_K (1..64), maxnreg (Triton's register cap
    a thread, 32..255, a multiple of 8: left alone, sm_90 ptxas issues some of a step's loads after its
    first FMAs, a second wait on memory); every key optional."""
    if not isinstance(config, dict) or set(config) - _CONFIG_KEYS:
        raise ValueError(f"config must be a dict with keys among {sorted(_CONFIG_KEYS)}, got {config!r}")
    for key, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"config[{key!r}] must be an int, got {value!r}")
    ok = {"BLOCK_N": lambda v: 8 <= v <= 128 and v & (v - 1) == 0, "num_warps": lambda v: v in (1, 2, 4, 8, 16),
          "num_stages": lambda v: 1 <= v <= 8, "SPLIT_K": lambda v: 1 <= v <= 64,
          "maxnreg": lambda v: 32 <= v <= 255 and v % 8 == 0}
    bad = [f"{k}={v}" for k, v in config.items() if not ok[k](v)]
    if bad:
        raise ValueError(f"bad launch config {', '.join(bad)}: BLOCK_N is a power of two in 8..128, num_warps "
                         "1/2/4/8/16, num_stages 1..8, SPLIT_K 1..64, maxnreg a multiple of 8 in 32..255")
    return config


def launch_meta(qtype: str, m: int, dtype: torch.dtype, has_bias: bool,
                config: dict[str, int] | None = None) -> tuple[dict[str, int | bool], int]:
    """The kernel's constexprs and num_warps for M = ``m`` rows of x in ``dtype`` (the tests compile
    these for sm_90 without a GPU); ``config`` (see :func:`check_config`) overrides the fixed guesses.
    With SPLIT_K > 1 the kernel adds fp32 partials without bias (the launcher adds it)."""
    use_dot = m > 1 and dtype != torch.float32
    block_n, warps = (_DOT_BLOCK_N, _DOT_WARPS) if use_dot else (_FMA_BLOCK_N, _FMA_WARPS)
    config = check_config({} if config is None else config)
    split_k = config.get("SPLIT_K", 1)
    meta = {**layout_meta(qtype), "HAS_BIAS": has_bias and split_k == 1,
            "USE_DOT": use_dot, "IS_FP32": dtype == torch.float32, "UPCAST": INTERPRET and dtype == torch.bfloat16,
            "RNE_BF16": INTERPRET and dtype == torch.bfloat16,
            "BLOCK_M": max(16, triton.next_power_of_2(m)) if use_dot else 1,
            "BLOCK_N": config.get("BLOCK_N", block_n), "SPLIT_K": split_k}
    return meta, config.get("num_warps", warps)


def ggml_gemv(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """Decode matmul on ggml blocks: ``x @ dequant(blocks).T + bias`` as [M, N], fp32 accumulation.

    x: [M, K] bf16 / fp16 / fp32, unit stride along K, 1 <= M <= 64; blocks: uint8
    [N, row_bytes(qtype, K)] of ``qtype`` "q4_k", "q5_k", "q6_k" (K a multiple of 256) or "q8_0",
    "q4_0", "q4_1", "q5_0", "q5_1" (K a multiple of 32) (GGUF tensor rows), contiguous, 2-byte aligned;
    bias [N] in x's dtype or None; out: [M, N] in x's dtype with unit stride along N and any row
    stride (e.g. a column slice of a fused projection's output), or None for a new tensor.
    config: a launch override for probes and tests (:func:`check_config`; ``{}``: the fixed guesses);
    None (the engine): ``kernels.ggml_tuned``'s measured pick on sm_90, else the fixed guesses;
    SPLIT_K > 1 sums fp32 partials in a zeroed workspace, then adds bias and rounds once into out.
    Returns out.  bf16 / fp16 x reads each block byte once for all M rows; fp32 x once per row.
    """
    h = _check(x, blocks, qtype, bias)
    (M, K), N = x.shape, blocks.shape[0]
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    check_out(out, (M, N), x.dtype, x)
    if config is None:  # the H200's measured pick for this shape, else launch_meta's fixed guesses
        config = ggml_tuned.pick(qtype, M, N, K, x.dtype, x.device)
    meta, warps = launch_meta(qtype, M, x.dtype, bias is not None, config)
    split_k = meta["SPLIT_K"]
    dst = out if split_k == 1 else torch.zeros((M, N), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, meta["BLOCK_N"]), 1 if meta["USE_DOT"] else M, split_k)
    opts = {k: config[k] for k in ("num_stages", "maxnreg") if config and k in config}
    _ggml_gemv_kernel[grid](x, blocks, h, x if bias is None else bias, dst, M, N, K // BLOCKS[qtype][0],
                            blocks.shape[1], x.stride(0), dst.stride(0), **meta, num_warps=warps, **opts)
    if split_k > 1:
        out.copy_(dst if bias is None else dst + bias.float())
    return out


def ggml_gemv_ref(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch reference for :func:`ggml_gemv`: fp32 matmul on :func:`kernels.ggml_blocks.dequant_ref`'s
    weight, bias added in fp32, rounded once to x's dtype."""
    out = x.float() @ dequant_ref(blocks, qtype, x.shape[1]).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
