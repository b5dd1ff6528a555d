# Flash decoding (split-KV): one new query token per sequence against a KV cache, GQA.
#
# Shapes:  q         [B, Hq, D]     unit stride along D (other strides free)
#          k_cache   [B, Hk, S, D]  unit stride along D
#          v_cache   [B, Hk, S, D]  unit stride along D
#          seq_lens  int32 [B]      keys 0..seq_lens[b]-1 are valid (0 -> zeros)
#          out       [B, Hq, D]     new contiguous tensor, dtype of q
# Pass 1:  grid (B * Hk, NUM_SPLITS).  A program takes one (batch, kv head,
#          sequence chunk) and ALL Hq // Hk query heads of that group as the
#          rows of a [BLOCK_H >= 16, BLOCK_D] tile, so the chunk's K/V is read
#          from HBM exactly once.  It writes fp32 partials (running max m in the
#          log2 domain, sum l, unnormalised acc) to a workspace
#          m, l: [B * Hq, NUM_SPLITS]; acc: [B * Hq, NUM_SPLITS, BLOCK_D].
# Pass 2:  grid (B * Hq,) rescales and merges the splits.
# Splits:  chosen on the host from max_seq_len (default S) and the SM count so
#          that B * Hk * NUM_SPLITS programs fill the GPU at long contexts.
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.checks import check_kv_cache
from kernels.flash_common import online_softmax_pv, qk_scores
from kernels.tuning import bench_ms

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
_CHUNK_ALIGN = 16 if _INTERPRET else 128
_MIN_CHUNK = 32 if _INTERPRET else 256
_MAX_SPLITS = 256


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16})]
    shapes = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 3), (32, 4, 4)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


def _default_config(dtype: torch.dtype) -> triton.Config:
    """Untimed config (KERNELS_AUTOTUNE=0 / interpreter) that fits shared memory for dtype."""
    if _INTERPRET:
        return _configs()[0]
    return triton.Config({"BLOCK_N": 32 if dtype == torch.float32 else 64}, num_warps=4, num_stages=2)


@triton.jit
def _decode_block(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, n0, hi,
                  offs_n, offs_d, d_mask, qk_scale, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of all group heads with keys n0 .. n0 + BLOCK_N - 1 (< hi)."""
    offs = n0 + offs_n
    kv_mask = (offs < hi)[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    s = qk_scores(q, k, IS_FP32, UPCAST)
    s = tl.where((offs < hi)[None, :], s * qk_scale, float("-inf"))
    return online_softmax_pv(acc, l_i, m_i, s, v, IS_FP32, UPCAST)


@triton.jit
def _attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, seqlen_ptr, ws_m_ptr, ws_l_ptr, ws_acc_ptr,
    qk_scale, Hq, Hk, D, GROUP, CHUNK, NUM_SPLITS,
    sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0) // Hk
    kvh = tl.program_id(0) % Hk
    split = tl.program_id(1)
    seq = tl.load(seqlen_ptr + b)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, seq)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    heads = kvh * GROUP + tl.minimum(offs_h, GROUP - 1)  # padded rows repeat a real head
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                mask=d_mask[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter multiplies bf16 as raw uint16 bits
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * sk_b + kvh * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + kvh * sv_h

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _decode_block(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, n0, hi,
                                      offs_n, offs_d, d_mask, qk_scale, IS_FP32, UPCAST)

    rows = (b * Hq + kvh * GROUP + offs_h).to(tl.int64) * NUM_SPLITS + split
    h_mask = offs_h < GROUP
    tl.store(ws_m_ptr + rows, m_i, mask=h_mask)
    tl.store(ws_l_ptr + rows, l_i, mask=h_mask)
    tl.store(ws_acc_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=h_mask[:, None])


_decode_tuned = triton.autotune(configs=_configs(), key=["BLOCK_H", "BLOCK_D", "CHUNK"],
                                do_bench=bench_ms)(_attention_decode_kernel)
# (BLOCK_H, BLOCK_D, chunk, dtype) -> tuned config; later calls skip the autotuner's overhead
_TUNED: dict[tuple, triton.Config] = {}


@triton.jit
def _attention_decode_reduce_kernel(
    ws_m_ptr, ws_l_ptr, ws_acc_ptr, out_ptr, NUM_SPLITS, Hq, D, so_b, so_h,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    base = row.to(tl.int64) * NUM_SPLITS
    m = tl.load(ws_m_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(ws_l_ptr + base + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(ws_acc_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty -> zeros
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, axis=0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    out = tl.sum(w[:, None] * acc, axis=0) / denom
    b = row // Hq
    h = row % Hq
    tl.store(out_ptr + b.to(tl.int64) * so_b + h * so_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _split_plan(sms: int, B: int, Hk: int, max_len: int) -> tuple[int, int]:
    """Return (num_splits, chunk) with chunk a multiple of _CHUNK_ALIGN tokens."""
    max_len = max(max_len, 1)
    want = triton.cdiv(2 * sms, max(B * Hk, 1))
    splits = max(1, min(want, triton.cdiv(max_len, _MIN_CHUNK), _MAX_SPLITS))
    chunk = triton.cdiv(triton.cdiv(max_len, splits), _CHUNK_ALIGN) * _CHUNK_ALIGN
    return triton.cdiv(max_len, chunk), chunk


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected bf16, fp16 or fp32")
    B, Hq, D = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_kv_cache(name, c, q, B, D)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.shape[1] == 0 or Hq % k_cache.shape[1] != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hk={k_cache.shape[1]}")
    if q.stride(2) != 1:
        raise ValueError("q must have unit stride along D (last dim)")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D={D} unsupported (1..256)")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be a 1-D int32 tensor of length B={B}, "
                         f"got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if seq_lens.device != q.device:
        raise ValueError(f"device mismatch: seq_lens on {seq_lens.device}, q on {q.device}")


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float,
                     max_seq_len: int | None = None) -> torch.Tensor:
    """Split-KV (flash-decoding) GQA attention of one query token per sequence.

    q: [B, Hq, D] (unit stride along D), k_cache/v_cache: [B, Hk, S, D],
    seq_lens: int32 [B] (keys 0..seq_lens[b]-1 valid; 0 gives zeros).
    max_seq_len: optional host-side bound on seq_lens used to size the splits
    (default S; no device sync either way; must be >= max(seq_lens)).
    Returns a new contiguous [B, Hq, D] tensor in q's dtype.
    """
    _check(q, k_cache, v_cache, seq_lens)
    B, Hq, D = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    max_len = S if max_seq_len is None else min(int(max_seq_len), S)
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    if B == 0:
        return out
    sms = _num_sms(q.device.index or 0) if q.is_cuda else 16
    splits, chunk = _split_plan(sms, B, Hk, max_len)
    block_d = max(16, triton.next_power_of_2(D))
    block_h = max(16, triton.next_power_of_2(Hq // Hk))
    n_part = B * Hq * splits  # one allocation: acc [n_part, block_d] | m [n_part] | l [n_part]
    ws = torch.empty(n_part * (block_d + 2), device=q.device, dtype=torch.float32)
    ws_acc, ws_m, ws_l = ws[: n_part * block_d], ws[n_part * block_d: -n_part], ws[-n_part:]
    args = (q, k_cache, v_cache, seq_lens, ws_m, ws_l, ws_acc, float(scale) * _LOG2E,
            Hq, Hk, D, Hq // Hk, chunk, splits, *q.stride()[:2],
            *k_cache.stride()[:3], *v_cache.stride()[:3])
    consts = dict(BLOCK_H=block_h, BLOCK_D=block_d, IS_FP32=q.dtype == torch.float32,
                  UPCAST=_INTERPRET and q.dtype == torch.bfloat16)
    key = (block_h, block_d, chunk, q.dtype)
    cfg = _TUNED.get(key)
    if cfg is None and (_INTERPRET or os.environ.get("KERNELS_AUTOTUNE", "1") == "0"):
        cfg = _TUNED[key] = _default_config(q.dtype)
    if cfg is None:
        _decode_tuned[(B * Hk, splits)](*args, **consts)
        _TUNED[key] = _decode_tuned.best_config
    else:
        _attention_decode_kernel[(B * Hk, splits)](
            *args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _attention_decode_reduce_kernel[(B * Hq,)](
        ws_m, ws_l, ws_acc, out, splits, Hq, D, out.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
    )
    return out


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 torch reference for :func:`attention_decode` (returns float32)."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        k = k_cache[b, :, :n].float().repeat_interleave(Hq // Hk, dim=0)  # [Hq, n, D]
        v = v_cache[b, :, :n].float().repeat_interleave(Hq // Hk, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
    return out
