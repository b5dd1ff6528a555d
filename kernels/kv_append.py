# Append new keys/values into a per-sequence KV cache, in place.
#
# Shapes:  k, v [B, T, Hk, D];  k_cache, v_cache [B, Hk, S, D];  start_pos [B] int32 (int64 ok).
# Effect:  k_cache[b, h, start_pos[b] + t] = k[b, t, h]  (same for v) for every t with
#          0 <= start_pos[b] + t < S; positions outside [0, S) are skipped, never written.
# Strides: k, v, k_cache, v_cache may have arbitrary strides over their first 3 dims (k/v are
#          typically slices of a fused qkv output); the last dim of each must be contiguous.
#          k/v share a shape, the caches share a shape; strides may differ between tensors.
# Dtypes:  bf16 / fp16 / fp32, all four tensors the same dtype (plain copy, no math).
# Grid:    (B*T, cdiv(Hk, BLOCK_H)); each program copies BLOCK_H heads of k and of v.
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.checks import check_device
from kernels.fastlaunch import fast

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _copy_heads(src, dst, heads, s_h, d_h, mask, d):
    vals = tl.load(src + heads[:, None] * s_h + d[None, :], mask=mask, other=0.0)
    tl.store(dst + heads[:, None] * d_h + d[None, :], vals, mask=mask)


@triton.jit
def _kv_append_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, start_ptr,
    T, HK, S, D,
    skb, skt, skh, svb, svt, svh,
    scb, sch, scs, sdb, sdh, sds,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    pos = tl.load(start_ptr + b).to(tl.int64) + t
    in_range = (pos >= 0) & (pos < S)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    # fold the scalar in_range into the head limit (scalar & block masks trip the interpreter)
    mask = (heads[:, None] < tl.where(in_range, HK, 0)) & (d[None, :] < D)
    _copy_heads(k_ptr + b * skb + t * skt, kc_ptr + b * scb + pos * scs, heads, skh, sch, mask, d)
    _copy_heads(v_ptr + b * svb + t * svt, vc_ptr + b * sdb + pos * sds, heads, svh, sdh, mask, d)


def _validate(k, v, k_cache, v_cache, start_pos) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"kv_append_: k and v must be equal 4-D [B, T, Hk, D], got {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, hk, d = k.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"kv_append_: caches must be equal 4-D [B, Hk, S, D], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if k_cache.shape[0] != b or k_cache.shape[1] != hk or k_cache.shape[3] != d:
        raise ValueError(f"kv_append_: cache {tuple(k_cache.shape)} does not match k {tuple(k.shape)} on B, Hk or D")
    if k.dtype not in _FLOAT_DTYPES or any(x.dtype != k.dtype for x in (v, k_cache, v_cache)):
        raise ValueError(
            f"kv_append_: k, v, k_cache, v_cache must share a float dtype, got "
            f"{k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if any(x.stride(-1) != 1 for x in (k, v, k_cache, v_cache)):
        raise ValueError("kv_append_: the last dim of k, v, k_cache and v_cache must be contiguous")
    if start_pos.shape != (b,) or start_pos.dtype not in _INT_DTYPES:
        raise ValueError(f"kv_append_: start_pos must be int32 [{b}], got {start_pos.dtype} {tuple(start_pos.shape)}")
    check_device(k, v, k_cache, v_cache, start_pos)


def kv_append_(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: torch.Tensor
) -> None:
    """Write ``k[b, t]``/``v[b, t]`` into the caches at position ``start_pos[b] + t``, in place.

    Positions outside ``[0, S)`` are skipped.  See the file header for shapes and strides.
    """
    _validate(k, v, k_cache, v_cache, start_pos)
    b, t, hk, d = k.shape
    if b * t * hk * d == 0 or k_cache.shape[2] == 0:
        return
    start = start_pos.contiguous()
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(hk), max(1, 2048 // block_d))
    grid = (b * t, triton.cdiv(hk, block_h))
    _kv_append_launch[grid](
        k, v, k_cache, v_cache, start,
        t, hk, k_cache.shape[2], d,
        *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


def kv_append_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: returns updated float32 copies ``(k_cache, v_cache)``; inputs are untouched."""
    kc, vc = k_cache.float().clone(), v_cache.float().clone()
    seq_len = kc.shape[2]
    for b in range(k.shape[0]):
        for t in range(k.shape[1]):
            pos = int(start_pos[b]) + t
            if 0 <= pos < seq_len:
                kc[b, :, pos] = k[b, t].float()
                vc[b, :, pos] = v[b, t].float()
    return kc, vc


_kv_append_launch = fast(_kv_append_kernel)  # launched through kernels.fastlaunch
