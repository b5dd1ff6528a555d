# RoPE and KV append in one launch: q rotated in place, k rotated straight into the key cache, v copied
# into the value cache (kernels/rope.py then kernels/kv_append.py): a decode step's one token a sequence, or
# a prompt slice's T tokens.
#
# Shapes:  q [B, T, Hq, D], k / v [B, T, Hk, D] (strided views, e.g. of the fused qkv output; last dim
#          contiguous), k_cache / v_cache [B, Hk, S, D] (last dim contiguous), cos / sin [P, D//2] fp32
#          contiguous, positions [B, T] int32/int64 (the table rows), start_pos [B] int32/int64 (the cache
#          position of each row's first token).
# Math:    HF rotate-half in fp32 as kernels/rope.py, stored in q's dtype: q[b, t, h] in place, and k[b, t, h]
#          rotated into k_cache[b, h, start_pos[b] + t] (k itself is left as it was); v[b, t, h] into
#          v_cache[b, h, start_pos[b] + t]. A cache position outside [0, S) is skipped (nothing written, as
#          kv_append_); a table row outside [0, P) leaves the token unrotated (as apply_rope_).
# Dtypes:  q, k, v and both caches one float dtype (bf16 / fp16 / fp32).
# Grid:    (B * T,): a program takes a token's every head: q as [BLOCK_HQ, HALF] halves, k likewise, v as
#          [BLOCK_HK, D]. A token's heads are few (28 + 4 + 4 of 128 on the 7B: 18 KB), so one program a
#          token is enough; the point is the launch saved (one a layer and step, or a layer and prompt group:
#          252 of a 7B AWQ burst pass's 2,976 launches, session 27).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_append import _validate as _validate_append
from kernels.kv_append import kv_append_ref
from kernels.rope import _validate as _validate_rope
from kernels.rope import apply_rope_ref
from kernels.fastlaunch import fast
from kernels.pdl import enter as pdl_enter, opts as pdl_opts


@triton.jit
def _rotate_store(src, dst, heads, s_h, d_h, mask, i, c, s, HALF: tl.constexpr):
    x1 = tl.load(src + heads[:, None] * s_h + i[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + heads[:, None] * s_h + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    tl.store(dst + heads[:, None] * d_h + i[None, :], (x1 * c - x2 * s).to(out_ty), mask=mask)
    tl.store(dst + heads[:, None] * d_h + HALF + i[None, :], (x2 * c + x1 * s).to(out_ty), mask=mask)


@triton.jit
def _rope_kv_append_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, start_ptr, crow_ptr,
    T, HQ, HK, P, S, D,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, scb, sch, scs, sdb, sdh, sds, spb, spt,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, PDL_CHAIN: tl.constexpr = False, VARLEN: tl.constexpr = False,
):
    pdl_enter(PDL_CHAIN)
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    row = tl.load(pos_ptr + b * spb + t * spt).to(tl.int64)
    if VARLEN:  # B = 1 of T flat rows: token t's cache row crow[t], its cache position start[t]
        at = tl.load(start_ptr + t).to(tl.int64)
        c_row = tl.load(crow_ptr + t).to(tl.int64)
    else:
        at = tl.load(start_ptr + b).to(tl.int64) + t
        c_row = b
    i = tl.arange(0, BLOCK_HALF)
    # scalar conditions folded into the limits (scalar & block masks trip the interpreter)
    table = i < tl.where((row >= 0) & (row < P), HALF, 0)  # outside the table: c = 1, s = 0 (unrotated)
    c = tl.load(cos_ptr + row * HALF + i, mask=table, other=1.0)[None, :]
    s = tl.load(sin_ptr + row * HALF + i, mask=table, other=0.0)[None, :]
    hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    q_row = q_ptr + b * sqb + t * sqt
    _rotate_store(q_row, q_row, hq, sqh, sqh, (hq[:, None] < HQ) & (i[None, :] < HALF), i, c, s, HALF)
    hk = tl.arange(0, BLOCK_HK).to(tl.int64)
    in_cache = tl.where((at >= 0) & (at < S), HK, 0)
    _rotate_store(k_ptr + b * skb + t * skt, kc_ptr + c_row * scb + at * scs, hk, skh, sch,
                  (hk[:, None] < in_cache) & (i[None, :] < HALF), i, c, s, HALF)
    d = tl.arange(0, BLOCK_D)
    v_mask = (hk[:, None] < in_cache) & (d[None, :] < D)
    vals = tl.load(v_ptr + b * svb + t * svt + hk[:, None] * svh + d[None, :], mask=v_mask, other=0.0)
    tl.store(vc_ptr + c_row * sdb + at * sds + hk[:, None] * sdh + d[None, :], vals, mask=v_mask)


def rope_kv_append_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    start_pos: torch.Tensor, cache_rows: torch.Tensor | None = None) -> None:
    """``apply_rope_(q, k, cos, sin, positions)`` then ``kv_append_(k, v, k_cache, v_cache, start_pos)`` in one
    launch; unlike that pair, ``k`` itself stays unrotated (only its cached copy is). See the file header for
    shapes; ValueError for anything else. ``cache_rows`` (int32 [T]): q / k / v / positions hold one batch row
    of T tokens from several sequences (a pass's stacked prompt slices), token t going to cache row
    ``cache_rows[t]`` of the caches [C, Hk, S, D] at position ``start_pos[t]`` (start_pos then [T] too; a
    negative position writes nothing)."""
    _validate_rope(q, k, cos, sin, positions)
    if cache_rows is None:
        _validate_append(k, v, k_cache, v_cache, start_pos)
    else:
        _validate_rows(k, v, k_cache, v_cache, start_pos, cache_rows)
    b, t, hq, d = q.shape
    if k_cache.dtype != q.dtype:
        raise ValueError(f"rope_kv_append_: the caches must be in q's dtype {q.dtype}, got {k_cache.dtype}")
    hk = k.shape[2]
    if b * t == 0 or k_cache.shape[2] == 0:
        return
    half = d // 2
    _rope_kv_append_launch[(b * t,)](
        q, k, v, k_cache, v_cache, cos, sin, positions, start_pos.contiguous(),
        start_pos if cache_rows is None else cache_rows.contiguous(), t, hq, hk, cos.shape[0], k_cache.shape[2], d,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], *positions.stride(),
        HALF=half, BLOCK_HQ=max(2, triton.next_power_of_2(hq)), BLOCK_HK=max(2, triton.next_power_of_2(hk)),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
        VARLEN=cache_rows is not None, **pdl_opts(q),
    )


def _validate_rows(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   start_pos: torch.Tensor, cache_rows: torch.Tensor) -> None:
    """The operands of a call with ``cache_rows``: one batch row of T tokens, a cache row and position each."""
    if k.dim() != 4 or k.shape[0] != 1 or k_cache.dim() != 4:
        raise ValueError(f"rope_kv_append_: with cache_rows, k must be [1, T, Hk, D] and the caches 4-D, got "
                         f"{tuple(k.shape)}, {tuple(k_cache.shape)}")
    t = k.shape[1]
    for name, x in (("start_pos", start_pos), ("cache_rows", cache_rows)):
        if x.shape != (t,) or x.dtype not in (torch.int32, torch.int64) or x.device != k.device:
            raise ValueError(f"rope_kv_append_: {name} must be an int32 or int64 [{t}] tensor on {k.device}, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
    _validate_append(k, v, k_cache[:1], v_cache[:1], start_pos[:1])  # dtypes, heads, head dim, strides


def rope_kv_append_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       start_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 reference: new ``(q rotated, k_cache, v_cache)`` (inputs untouched); positions outside the table
    leave the token unrotated, as the kernel does."""
    p = cos.shape[0]
    inside = (positions >= 0) & (positions < p)
    q_rot, k_rot = apply_rope_ref(q, k, cos, sin, positions.clamp(0, p - 1))
    keep = inside[:, :, None, None]
    q_rot, k_rot = torch.where(keep, q_rot, q.float()), torch.where(keep, k_rot, k.float())
    kc, vc = kv_append_ref(k_rot, v, k_cache, v_cache, start_pos)
    return q_rot, kc, vc


_rope_kv_append_launch = fast(_rope_kv_append_kernel)  # launched through kernels.fastlaunch
