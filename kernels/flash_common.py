"""Triton device functions shared by the attention kernels (not an op of its own).

Shapes: q [BLOCK_M, BLOCK_D], k and v [BLOCK_N, BLOCK_D] tiles already loaded; scores
[BLOCK_M, BLOCK_N]; the running max ``m_i`` and sum ``l_i`` are [BLOCK_M] and the
accumulator [BLOCK_M, BLOCK_D], all fp32. Scores are in log2 units (log2(e) folded into
the scale by the callers) so the update uses exp2.

Split-KV (flash-decoding) helpers of kernels/attention_decode.py: the chunk of keys per split,
the merge of the fp32 partials in the workspace
(m, l: [rows, NUM_SPLITS], acc: [rows, NUM_SPLITS, BLOCK_D]) and the store of finished rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def qk_scores(q, k, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """q @ k^T in fp32 (exact fp32 dots for fp32 inputs)."""
    if UPCAST:  # the CPU interpreter multiplies bf16 as raw uint16 bits
        k = k.to(tl.float32)
    if IS_FP32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def online_softmax_pv(acc, l_i, m_i, s, v, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one block of masked scores ``s`` and values ``v`` into (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    if IS_FP32:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def merge_splits(ws_m_ptr, ws_l_ptr, ws_acc_ptr, row0, n_rows, n_valid, NUM_SPLITS,
                 BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalised fp32 [BLOCK_G, BLOCK_D] output of workspace rows row0 .. row0 + n_rows - 1
    (m, l: [rows, NUM_SPLITS], acc: [rows, NUM_SPLITS, BLOCK_D]) from their first n_valid splits,
    BLOCK_S splits a step; zeros when n_valid == 0. Rows past n_rows repeat the last real one."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (row0 + tl.minimum(tl.arange(0, BLOCK_G), n_rows - 1)).to(tl.int64) * NUM_SPLITS
    m_run = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, n_valid, BLOCK_S):
        idx = rows[:, None] + (s0 + offs_s)[None, :]  # [BLOCK_G, BLOCK_S]
        s_mask = (s0 + offs_s < n_valid)[None, :]
        # .cg: read at L2, where the other programs' partials are (never a stale L1 line)
        m = tl.load(ws_m_ptr + idx, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(ws_l_ptr + idx, mask=s_mask, other=0.0, cache_modifier=".cg")
        part = tl.load(ws_acc_ptr + idx[:, :, None] * BLOCK_D + offs_d[None, None, :],
                       mask=s_mask[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=1))  # finite: split s0 holds >= 1 key
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new[:, None])
        l_run = l_run * alpha + tl.sum(w * l, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, axis=1)
        m_run = m_new
    return acc / tl.where(l_run > 0.0, l_run, 1.0)[:, None]


@triton.jit
def chunk_len(seq, NUM_SPLITS, ALIGN):
    """Keys per split of a seq-key sequence: cdiv(seq, NUM_SPLITS) rounded up to ALIGN (>= ALIGN)."""
    return tl.cdiv(tl.maximum(tl.cdiv(seq, NUM_SPLITS), 1), ALIGN) * ALIGN


@triton.jit
def store_rows(out_ptr, o, b, h0, n, so_b, so_h, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h0 + r, :D] = o[r] for the first n rows r of an fp32 [BLOCK_R, BLOCK_D] tile."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = out_ptr + b.to(tl.int64) * so_b + (h0 + offs_r)[:, None] * so_h + offs_d[None, :]
    tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=(offs_r < n)[:, None] & (offs_d < D)[None, :])
