# Quantized prefill GEMM: out = x @ dequant(w).T + bias (weight in the packed layout of
# kernels/quant_common.py).
#
# Shapes:  x       [M, K]          any row stride, unit stride along K; bf16 / fp16 / fp32
#          qweight int32 [N, K*BITS/32]; scales fp16 / bf16 / fp32 [N, K/G]; zeros (or additive mins) like
#          scales or None
#          perm    [K] or None     act-order input permutation (x[:, perm] is taken on the host)
#          bias    [N]             x's dtype, optional
#          out     [M, N]          new contiguous tensor, dtype of x
# Scheme:  one program per [BLOCK_M, BLOCK_N] output tile, grouped (GROUP_M) program order so
#          neighbouring programs share packed weight tiles in L2, as kernels/gemm.py's pointer
#          family. Each K step loads the packed words of BLOCK_N rows (BLOCK_K * BITS / 8 bytes per
#          row, contiguous), dequantizes them in fp32 registers (kernels.quant_common.load_dequant),
#          casts to x's dtype and runs a tensor-core tl.dot with fp32 accumulation (fp32 inputs:
#          input_precision="ieee").  Rows are clamped by % M / % N, only the K tail and the store
#          are masked.
# Tuning:  per (M bucket, N, K, G, BITS, zeros, mins, x dtype, scale dtype, bias) at first use through
#          kernels.tuning.fastest (CUDA-graph replays, cold where the packed weight fits the L2) and
#          the on-disk tuning cache; KERNELS_AUTOTUNE=0 and the interpreter use a fixed config.
# Variants (config SWAP_AB and VARIANT, kernels/quant_variants.py), all timed by the tuner:
#          base   VARIANT 0: load_dequant's [BN, BK] tile (reshaped codes) as the B operand of x @ w.T.
#          swap   SWAP_AB: acc_t[BN, BM] = w @ x.T, the dequantized weight (registers) as the A
#                 operand (Hopper's wgmma reads A from registers, B only from shared memory), x as
#                 B; the tile is transposed once at the store.
#          split  VARIANT 3 (with or without SWAP_AB): P dots of K = BK / P per K step, no reshape;
#                 x is permuted once per call on the host (_split_x) so that the columns each dot
#                 needs (k0 + j * P + i) are contiguous.
#          Candidates (_SHAPES): 4 base (the first version's large tiles), 6 swap (BN 128 / 256 x BM
#          64 / 128 x BK 64 / 128), 3 split and 3 split + swap with BK 128 / 256 (BW = 16 / 32 for
#          int4; at 3 stages BK = 256 with BM = 128 needs more than the H200's 227 KiB of shared memory).
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels import tuning_cache
from kernels.gemm import grouped_tile
from kernels.mma import mma_nt
from kernels.quant_common import (agrees_with_reference, check_quant_inputs, dequant_ref, load_dequant,
                                  permute_input, scale_mode)
from kernels.quant_variants import load_words, split_dots, variant_ok, word_scales
from kernels.tuning import fastest, fits_l2, graph_ms, tuning_suspended

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def config(bm: int, bn: int, bk: int, group_m: int = 8, warps: int = 4, stages: int = 1,
           swap: bool = False, variant: int = 0) -> triton.Config:
    """One launch config (tests pin configs with it); ``variant`` 0 or 3 (kernels/quant_variants.py)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SWAP_AB": swap,
                          "VARIANT": variant}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB, VARIANT)
_SHAPES = [
    (128, 128, 64, 8, 3, False, 0), (128, 256, 64, 8, 3, False, 0), (256, 128, 64, 8, 3, False, 0),
    (128, 128, 128, 8, 3, False, 0),
    (64, 128, 256, 4, 3, True, 3), (128, 128, 128, 8, 3, True, 3), (64, 256, 256, 8, 3, True, 3),
]  # measured on the H200 at 2048 tokens (probe_qkernels.txt): split dots with the weight as the register
# operand won every Qwen2.5-7B shape (0.37-0.47x bf16 cuBLAS); the weight as A alone (swap) was no faster
# than base and split dots without swap were 1.4-1.6x slower than with it, so those are no longer timed


def _configs(group: int = 128, bits: int = 4) -> list[triton.Config]:
    """The tuning candidates for this group size and bit width (variants only where they can run)."""
    if _INTERPRET:
        return [config(64, 64, 64, 4)]
    return [config(bm, bn, bk, 8, w, st, swap, v) for bm, bn, bk, w, st, swap, v in _SHAPES
            if variant_ok(v, group, bits, bk)]


def _default_config() -> triton.Config:
    return _configs()[0] if _INTERPRET else config(128, 128, 64, 8, 8, 3)


@triton.jit
def _base_loop(acc, x_rows, q_ptr, s_ptr, z_ptr, rows_w, K, group, stride_qn, stride_sn,
               HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr, IS_FP32: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               SCALE_MODE: tl.constexpr, GROUP_C: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc + the tile's K loop with load_dequant's [BN, BK] weight tiles (x_rows: x's row pointers)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_rows + offs_k[None, :]
    dt = x_rows.dtype.element_ty
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        w = load_dequant(q_ptr, s_ptr, z_ptr, rows_w, stride_qn, stride_sn, k0, K, group,
                         HAS_ZEROS, BITS, BLOCK_N, BLOCK_K, SCALE_MODE, GROUP_C, EVEN_K, HAS_MINS)
        if EVEN_K:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        if SWAP_AB:  # weight rows are the MMA's M dimension, token rows its N
            acc = mma_nt(w.to(dt), a, acc, IS_FP32, UPCAST)
        else:
            acc = mma_nt(a, w.to(dt), acc, IS_FP32, UPCAST)
        x_ptrs += BLOCK_K
    return acc


@triton.jit
def _split_loop(acc, x_rows, q_ptr, s_ptr, z_ptr, rows_w, K, group, stride_qn, stride_sn,
                HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr, IS_FP32: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALE_MODE: tl.constexpr,
                SWAP_AB: tl.constexpr):
    """acc + the tile's K loop of split dots on x permuted by _split_x (x_i of the tile at k0 + i * BW + j)."""
    BW: tl.constexpr = BLOCK_K // (32 // BITS)
    x_ptrs = x_rows + tl.arange(0, BW)[None, :]
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        words = load_words(q_ptr, rows_w, stride_qn, k0, K, BITS, BW, EVEN_K)
        s, z = word_scales(s_ptr, z_ptr, rows_w, stride_sn, k0, K, group, HAS_ZEROS, HAS_MINS, BITS, BW,
                           SCALE_MODE)
        acc = split_dots(acc, words, s, z, x_ptrs + k0, None, BW, HAS_MINS, BITS, SWAP_AB, IS_FP32, UPCAST)
    return acc


@triton.jit
def _qgemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, group, stride_xm, stride_qn, stride_sn, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, BITS: tl.constexpr,
    IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_C: tl.constexpr,
    SWAP_AB: tl.constexpr, VARIANT: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = offs_n % N
    x_rows = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if VARIANT == 3:
        acc = _split_loop(acc, x_rows, q_ptr, s_ptr, z_ptr, rows_w, K, group, stride_qn, stride_sn, HAS_ZEROS,
                          HAS_MINS, BITS, IS_FP32, UPCAST, BLOCK_K, EVEN_K, SCALE_MODE, SWAP_AB)
    else:
        acc = _base_loop(acc, x_rows, q_ptr, s_ptr, z_ptr, rows_w, K, group, stride_qn, stride_sn, HAS_ZEROS,
                         HAS_MINS, BITS, IS_FP32, UPCAST, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, GROUP_C, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_w).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _split_x(x: torch.Tensor, block_k: int, bits: int) -> torch.Tensor:
    """x [M, K] with each BLOCK_K tile's columns in i-major order (column j * P + i moves to i * BW + j),
    zero-padded to whole tiles: the layout variant 3 reads (one copy of x per call)."""
    (m, k), per = x.shape, 32 // bits
    k_pad = triton.cdiv(k, block_k) * block_k
    if k_pad != k:
        x = torch.nn.functional.pad(x, (0, k_pad - k))
    return x.view(m, k_pad // block_k, block_k // per, per).transpose(2, 3).reshape(m, k_pad)


def _launch(cfg: triton.Config, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
            bits: int, group: int, bias: torch.Tensor | None, out: torch.Tensor,
            mins: bool = False) -> None:
    """One launch; ``z`` holds the zero points, or the additive mins when ``mins``."""
    (M, K), N = x.shape, q.shape[0]
    kw = cfg.kwargs
    mode, variant = scale_mode(group, K, kw["BLOCK_K"]), kw.get("VARIANT", 0)
    if variant not in (0, 3) or not variant_ok(variant, group, bits, kw["BLOCK_K"]):
        raise ValueError(f"qgemm variant {variant} cannot run group {group}, int{bits}, BLOCK_K {kw['BLOCK_K']}: "
                         "use 0, or 3 where kernels.quant_variants.variant_ok accepts it")
    if variant == 3:
        x = _split_x(x, kw["BLOCK_K"], bits)
    grid = (triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]),)
    _qgemm_kernel[grid](
        x, q, s, s if z is None else z, bias if bias is not None else out, out,
        M, N, K, group, x.stride(0), q.stride(0), s.stride(0), out.stride(0),
        HAS_ZEROS=z is not None and not mins, HAS_MINS=mins, HAS_BIAS=bias is not None, BITS=bits,
        IS_FP32=x.dtype == torch.float32,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=kw["BLOCK_M"], BLOCK_N=kw["BLOCK_N"],
        BLOCK_K=kw["BLOCK_K"], GROUP_M=kw["GROUP_M"], EVEN_K=K % kw["BLOCK_K"] == 0,
        SCALE_MODE=mode, GROUP_C=group if mode == 1 else 1, SWAP_AB=kw.get("SWAP_AB", False), VARIANT=variant,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# (M bucket, N, K, G, bits, has_zeros, x dtype, scale dtype, has_bias) -> tuned config
_TUNED: dict[tuple, triton.Config] = {}


def _tuned(x, q, s, z, bits, group, bias, out, mins=False) -> triton.Config:
    """The cached config for this call; the first call of a key tunes it (timing into out)."""
    (M, K), N = x.shape, q.shape[0]
    key = (min(triton.next_power_of_2(M), 4096), N, K, group, bits, z is not None, mins, x.dtype, s.dtype,
           bias is not None)
    cfg = _TUNED.get(key)
    if cfg is None and tuning_suspended():  # untimed: a cached or shipped pick, else the default; not kept
        return tuning_cache.untimed_pick(x.device, "qgemm", key, lambda: _configs(group, bits), _default_config())
    if cfg is None:
        cands = _configs(group, bits)
        if os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
            cands = [_default_config()]
        nbytes = q.nbytes + s.nbytes + (z.nbytes if z is not None else 0)
        timer = functools.partial(graph_ms, cold=fits_l2(nbytes, q.device))
        run = functools.partial(_launch, x=x, q=q, s=s, z=z, bits=bits, group=group, bias=bias, out=out,
                                mins=mins)
        accept = agrees_with_reference(x, q, s, z, bits, mins, bias, out)  # a miscompiled variant is never kept
        tune = functools.partial(fastest, cands, run, timer, accept=accept, name="qgemm", device=x.device)
        cfg = _TUNED[key] = tuning_cache.tuned(x.device, "qgemm", key, cands, tune) or _default_config()
    return cfg


def _qgemm(x, qweight, scales, zeros, bits, bias=None, perm=None, cfg=None, mins=None) -> torch.Tensor:
    """:func:`qgemm` with an optional pinned launch config (tests force each path with it)."""
    _, _, group = check_quant_inputs(x, qweight, scales, zeros, bits, bias, mins)
    z, has_mins = (mins, True) if mins is not None else (zeros, False)
    x = permute_input(x, perm)
    out = torch.empty((x.shape[0], qweight.shape[0]), device=x.device, dtype=x.dtype)
    _launch(cfg or _tuned(x, qweight, scales, z, bits, group, bias, out, has_mins),
            x, qweight, scales, z, bits, group, bias, out, has_mins)
    return out


def qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
          mins: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill matmul on a packed weight: ``x @ dequant(qweight, scales, zeros).T + bias`` as [M, N].

    Operands as :func:`kernels.qgemv.qgemv` without the row limit; the weight is dequantized tile
    by tile in registers, never into a full-precision copy.  The first call of a new shape tunes
    its launch config.
    """
    return _qgemm(x, qweight, scales, zeros, bits, bias, perm, mins=mins)


def qgemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
              mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`qgemm` (returns float32)."""
    xp = x.float() if perm is None else x.float()[:, perm.long()]
    out = xp @ dequant_ref(qweight, scales, zeros, bits, mins).T
    return out if bias is None else out + bias.float()
