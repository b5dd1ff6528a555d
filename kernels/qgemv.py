# Quantized decode GEMV / skinny GEMM: out = x @ dequant(w).T + bias for M = 1..64 token rows.
#
# Shapes:  x       [M, K]          any row stride, unit stride along K (M <= 64); bf16 / fp16 / fp32
#          qweight int32 [N, K*BITS/32]  codes packed along K (layout: kernels/quant_common.py)
#          scales  [N, K/G]        fp16 / bf16 / fp32;  zeros: like scales, or None (symmetric)
#          mins    [N, K/G] or None  additive group mins (w = code * scale + min; zeros then None)
#          perm    [K] or None     act-order input permutation (x[:, perm] is taken on the host)
#          bias    [N]             x's dtype, optional
#          out     [M, N]          new contiguous tensor, dtype of x
# Scheme:  memory-bound on the packed bytes.  Program (n, s) owns BLOCK_N weight rows and the s-th
#          of SPLIT_K slices of K and streams its packed words once (each row's words are one
#          contiguous run: coalesced, evict-first), unpacks the codes with shifts and dequantizes in
#          fp32 registers (kernels.quant_common.load_dequant); x is re-read from L1/L2.
#          M == 1: CUDA-core FMAs into a [BLOCK_N, BLOCK_K] fp32 tile, reduced once after the loop.
#          M >= 2: the dequantized tile, cast to x's dtype, goes through tensor-core tl.dot (x padded
#          to BLOCK_M = max(16, next_pow2(M)) rows), in either operand order (SWAP_AB as in
#          kernels/gemv.py).  SPLIT_K > 1 writes fp32 partials summed by the last program of the
#          N block (ticket) or by a second kernel (kernels/split_k.py).
# Tuning:  per (M bucket, N, K, G, BITS, zeros, mins, x dtype, scale dtype, bias) on first use, through
#          kernels.tuning.fastest and the on-disk tuning cache, timed cold where the packed weight
#          fits the L2 (as kernels/gemv.py); KERNELS_AUTOTUNE=0 and the interpreter use one config.
# Variants (config VARIANT, kernels/quant_variants.py), all timed by the tuner, which keeps the fastest:
#          M == 1: 0 "base" (load_dequant + reshape + I2F), 1 "3d" (no reshape, no I2F, the affine part
#          once per word, K loop software-pipelined by an explicit tl.range: Triton pipelines only loads
#          that feed a dot), 4 "i8x" (int4: x rounded to int8 per 32 columns, dp4a; kernels/qgemv_i8.py);
#          M >= 2: 0 (either SWAP_AB) and 3 "split" (P dots of K = BLOCK_K / P, either SWAP_AB), and 4 up to M = 4.
# Candidates: kernels/qgemv_candidates.py (bench/probe_qkernels.py times every candidate of every variant).
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels import qgemv_i8, tuning_cache
from kernels.split_k import reduce_split_k, split_k_scratch, store_split_k
from kernels.mma import mma_nt
from kernels.quant_common import (agrees_with_reference, check_quant_inputs, dequant_ref, load_dequant,
                                  permute_input, scale_mode)
from kernels.quant_variants import gemv_tile, load_words, split_dots, variant_ok, word_scales
from kernels.tuning import fastest, fits_l2, graph_ms, tuning_suspended
from kernels.fastlaunch import fast
# config and the i8x shape lists re-exported: tests and probes pin and list configs through this module
from kernels.qgemv_candidates import (_DEFAULT_DOT, _DEFAULT_FMA, _I8_ROWS_SHAPES, _I8_SHAPES,  # noqa: F401
                                      _candidates, config)
from kernels.pdl import enter as pdl_enter, opts as pdl_opts

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
@triton.jit
def _x_tile(x_ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(x_ptrs, eviction_policy="evict_last")
    return tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0, eviction_policy="evict_last")


@triton.jit
def _word_loop(x_ptr, q_ptr, s_ptr, z_ptr, rows_w, kb_lo, kb_hi, K, group, stride_qn, stride_sn,
               HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALE_MODE: tl.constexpr, VARIANT: tl.constexpr,
               STAGES: tl.constexpr, GROUP_C: tl.constexpr, ASM: tl.constexpr):
    """The [1, BLOCK_N] fp32 sum over K blocks kb_lo..kb_hi of variant 1 / 2's per-word partial sums.

    The loop is software-pipelined STAGES deep (cp.async of the packed words, scales and zeros of
    the next K blocks while this one computes): with a plain range and the launch's num_stages,
    Triton pipelines only loads that feed a tl.dot, and a batch-1 GEMV program then has one K
    block of words in flight (seen in the sm_90 TTGIR of the first version: no async copies)."""
    acc_w = tl.zeros((BLOCK_N, BLOCK_K // (32 // BITS)), dtype=tl.float32)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
        acc_w += gemv_tile(q_ptr, s_ptr, z_ptr, x_ptr, rows_w, stride_qn, stride_sn, kb * BLOCK_K, K, group,
                           HAS_ZEROS, HAS_MINS, BITS, BLOCK_K, SCALE_MODE, EVEN_K, VARIANT, GROUP_C, ASM)
    return tl.sum(acc_w, axis=1)[None, :]


@triton.jit
def _split_loop(x_ptr, q_ptr, s_ptr, z_ptr, rows_w, rows_x, kb_lo, kb_hi, K, group, stride_xm, stride_qn, stride_sn,
                HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr, IS_FP32: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_C: tl.constexpr,
                ASM: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] fp32 sum over K blocks kb_lo..kb_hi of variant 3's split dots."""
    PER: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BLOCK_K // PER
    offs_j = tl.arange(0, BW)
    x_ptrs = x_ptr + rows_x[:, None].to(tl.int64) * stride_xm + offs_j[None, :] * PER
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        words = load_words(q_ptr, rows_w, stride_qn, k0, K, BITS, BW, EVEN_K)
        s, z = word_scales(s_ptr, z_ptr, rows_w, stride_sn, k0, K, group, HAS_ZEROS, HAS_MINS, BITS, BW,
                           SCALE_MODE, GROUP_C)
        x_mask = None if EVEN_K else (k0 // PER + offs_j)[None, :] < K // PER
        acc = split_dots(acc, words, s, z, x_ptrs + k0, x_mask, 1, HAS_MINS, BITS, SWAP_AB, IS_FP32, UPCAST, ASM)
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _qgemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, group, stride_xm, stride_qn, stride_sn, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, BITS: tl.constexpr,
    IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, TICKET: tl.constexpr,
    SCALE_MODE: tl.constexpr, GROUP_C: tl.constexpr, VARIANT: tl.constexpr, STAGES: tl.constexpr,
    ASM: tl.constexpr = False, PDL_CHAIN: tl.constexpr = False,
):
    pdl_enter(PDL_CHAIN)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_k, SPLIT_K)
    kb_lo = tl.program_id(1) * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_k)
    rows_w = offs_n % N  # wrap the tail block onto valid rows; the store masks it
    rows_x = tl.minimum(offs_m, M - 1)
    x_ptrs = x_ptr + rows_x[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    dt = x_ptr.dtype.element_ty

    if BLOCK_M == 1 and VARIANT > 0:  # 3d: per-word partial sums
        acc = _word_loop(x_ptr, q_ptr, s_ptr, z_ptr, rows_w, kb_lo, kb_hi, K, group, stride_qn, stride_sn,
                         HAS_ZEROS, HAS_MINS, BITS, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, VARIANT, STAGES, GROUP_C, ASM)
    elif BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            w = load_dequant(q_ptr, s_ptr, z_ptr, rows_w, stride_qn, stride_sn, kb * BLOCK_K, K, group,
                             HAS_ZEROS, BITS, BLOCK_N, BLOCK_K, SCALE_MODE, GROUP_C, EVEN_K, HAS_MINS)
            x = _x_tile(x_ptrs + kb * BLOCK_K, offs_k, K - kb * BLOCK_K, EVEN_K)
            acc2 += w * x.to(tl.float32)
        acc = tl.sum(acc2, axis=1)[None, :]
    elif VARIANT == 3:  # split dots: x_i are the columns k0 + j * P + i (stride P, from L1/L2)
        acc = _split_loop(x_ptr, q_ptr, s_ptr, z_ptr, rows_w, rows_x, kb_lo, kb_hi, K, group, stride_xm,
                          stride_qn, stride_sn, HAS_ZEROS, HAS_MINS, BITS, IS_FP32, UPCAST, BLOCK_M, BLOCK_N,
                          BLOCK_K, EVEN_K, SWAP_AB, SCALE_MODE, GROUP_C, ASM)
    elif SWAP_AB:  # weight rows are the MMA's M dimension, token rows its N
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            w = load_dequant(q_ptr, s_ptr, z_ptr, rows_w, stride_qn, stride_sn, kb * BLOCK_K, K, group,
                             HAS_ZEROS, BITS, BLOCK_N, BLOCK_K, SCALE_MODE, GROUP_C, EVEN_K, HAS_MINS)
            x = _x_tile(x_ptrs + kb * BLOCK_K, offs_k, K - kb * BLOCK_K, EVEN_K)
            acc_t = mma_nt(w.to(dt), x, acc_t, IS_FP32, UPCAST)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            w = load_dequant(q_ptr, s_ptr, z_ptr, rows_w, stride_qn, stride_sn, kb * BLOCK_K, K, group,
                             HAS_ZEROS, BITS, BLOCK_N, BLOCK_K, SCALE_MODE, GROUP_C, EVEN_K, HAS_MINS)
            x = _x_tile(x_ptrs + kb * BLOCK_K, offs_k, K - kb * BLOCK_K, EVEN_K)
            acc = mma_nt(x, w.to(dt), acc, IS_FP32, UPCAST)

    store_split_k(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, rows_w, M, N, stride_om,
                  HAS_BIAS, SPLIT_K, TICKET, BLOCK_M, BLOCK_N)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch(cfg: triton.Config, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
            bits: int, group: int, bias: torch.Tensor | None, out: torch.Tensor, block_m: int,
            mins: bool = False) -> None:
    """One launch; ``z`` holds the zero points, or the additive mins when ``mins``."""
    (M, K), N = x.shape, q.shape[0]
    bn, bk, sk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.kwargs["SPLIT_K"]
    mode, variant = scale_mode(group, K, bk), cfg.kwargs.get("VARIANT", 0)
    if (not variant_ok(variant, group, bits, bk) or variant in (1, 2) and block_m > 1
            or variant == 3 and block_m == 1 or variant == 4 and not qgemv_i8.supports(M, K, bits, group, bk)):
        raise ValueError(f"qgemv variant {variant} cannot run M={M} (BLOCK_M {block_m}), group {group}, "
                         f"int{bits}, BLOCK_K {bk}: pick one that kernels.quant_variants.variant_ok accepts")
    asm = not _INTERPRET and x.is_cuda and torch.version.hip is None
    if variant == 4:
        qgemv_i8.launch_i8(cfg, x, q, s, z, group, bias, out, mins, asm)
        return
    ws, cnt = split_k_scratch(cfg, out, "qgemv")
    b = bias if bias is not None else out
    _qgemv_launch[(triton.cdiv(N, bn), sk)](
        x, q, s, s if z is None else z, b, out, ws, out if cnt is None else cnt,
        M, N, K, group, x.stride(0), q.stride(0), s.stride(0), out.stride(0),
        HAS_ZEROS=z is not None and not mins, HAS_MINS=mins, HAS_BIAS=bias is not None, BITS=bits,
        IS_FP32=x.dtype == torch.float32,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        SPLIT_K=sk, EVEN_K=K % bk == 0, SWAP_AB=cfg.kwargs.get("SWAP_AB", False), TICKET=cnt is not None,
        SCALE_MODE=mode, GROUP_C=group if mode == 1 else 1, VARIANT=variant, STAGES=cfg.num_stages,
        ASM=asm, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_opts(out))
    reduce_split_k(ws, cnt, bias, out)


# tuning_key(...) -> tuned config
_TUNED: dict[tuple, triton.Config] = {}


def tuning_key(M: int, N: int, K: int, group: int, bits: int, zeros: bool, mins: bool, x_dtype: torch.dtype,
               s_dtype: torch.dtype, bias: bool) -> tuple:
    """The key of a shape's tuned config in ``_TUNED`` and the tuning cache."""
    int8_x = M <= qgemv_i8.MAX_M and qgemv_i8.enabled() and x_dtype != torch.float32
    block_m = 1 if M == 1 else max(16, triton.next_power_of_2(M))
    return (block_m, N, K, group, bits, zeros, mins, x_dtype, s_dtype, bias,
            f"i8x{triton.next_power_of_2(M)}" if int8_x else "")  # its own bucket (picks from before it: tuned again)


def _tuned(x, q, s, z, bits, group, bias, out, block_m, mins=False) -> triton.Config:
    """The cached config for this shape; the first call tunes it (timing into out)."""
    (M, K), N = x.shape, q.shape[0]
    key = tuning_key(M, N, K, group, bits, z is not None, mins, x.dtype, s.dtype, bias is not None)
    assert key[0] == block_m
    int8_x = bool(key[-1])  # variant 4 is a candidate
    cfg = _TUNED.get(key)
    default = _DEFAULT_FMA if block_m == 1 else _DEFAULT_DOT
    if cfg is None and (tuning_suspended() or x.is_cuda and torch.cuda.is_current_stream_capturing()):
        sms = _num_sms(x.device.index or 0) if x.is_cuda else 1
        return tuning_cache.untimed_pick(x.device, "qgemv", key, lambda: _candidates(block_m, N, K, sms, group, bits,
                                         int8_x), default)  # a pick or the default; not kept
    if cfg is None:
        cands = _candidates(block_m, N, K, _num_sms(x.device.index or 0) if x.is_cuda else 1, group, bits, int8_x)
        if os.environ.get("KERNELS_AUTOTUNE", "1") == "0" and len(cands) > 1:
            cands = [default]
        nbytes = q.nbytes + s.nbytes + (z.nbytes if z is not None else 0)
        timer = functools.partial(graph_ms, cold=fits_l2(nbytes, q.device))
        run = functools.partial(_launch, x=x, q=q, s=s, z=z, bits=bits, group=group, bias=bias, out=out,
                                block_m=block_m, mins=mins)
        accept = agrees_with_reference(x, q, s, z, bits, mins, bias, out)  # a miscompiled variant is never kept
        tune = functools.partial(fastest, cands, run, timer, accept=accept, name="qgemv", device=x.device)
        cfg = _TUNED[key] = tuning_cache.tuned(x.device, "qgemv", key, cands, tune) or default
    return cfg


def _qgemv(x, qweight, scales, zeros, bits, bias=None, perm=None, cfg=None, mins=None) -> torch.Tensor:
    """:func:`qgemv` with an optional pinned launch config (tests force each path with it)."""
    _, _, group = check_quant_inputs(x, qweight, scales, zeros, bits, bias, mins)
    z, has_mins = (mins, True) if mins is not None else (zeros, False)
    M = x.shape[0]
    if M > 64:
        raise ValueError(f"qgemv supports at most 64 rows, got M={M}; use qgemm")
    x = permute_input(x, perm)
    out = torch.empty((M, qweight.shape[0]), device=x.device, dtype=x.dtype)
    block_m = 1 if M == 1 else max(16, triton.next_power_of_2(M))
    cfg = cfg or _tuned(x, qweight, scales, z, bits, group, bias, out, block_m, has_mins)
    _launch(cfg, x, qweight, scales, z, bits, group, bias, out, block_m, has_mins)
    return out


def qgemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
          mins: torch.Tensor | None = None) -> torch.Tensor:
    """Decode matmul on a packed weight: ``x @ dequant(qweight, scales, zeros).T + bias`` as [M, N].

    x: [M, K] (M in 1..64, unit stride along K, bf16/fp16/fp32); qweight int32 [N, K*bits/32];
    scales fp16/bf16/fp32 [N, K/G]; zeros like scales or None (symmetric: 2**(bits-1)); mins like
    scales or None (``w = code * scale + min``, zeros None); perm int32 [K] or None (act order);
    bias [N] in x's dtype or None.  fp32 accumulation, output in x's dtype;
    each packed word is read once.  The first call of a new shape tunes its launch config.
    """
    return _qgemv(x, qweight, scales, zeros, bits, bias, perm, mins=mins)


def qgemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
              mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`qgemv` (returns float32)."""
    xp = x.float() if perm is None else x.float()[:, perm.long()]
    out = xp @ dequant_ref(qweight, scales, zeros, bits, mins).T
    return out if bias is None else out + bias.float()


_qgemv_launch = fast(_qgemv_kernel)  # launched through kernels.fastlaunch
