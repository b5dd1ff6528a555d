"""Triton device functions shared by the two attention kernels (not an op of its own).

Shapes: q [BLOCK_M, BLOCK_D], k and v [BLOCK_N, BLOCK_D] tiles already loaded; scores
[BLOCK_M, BLOCK_N]; the running max ``m_i`` and sum ``l_i`` are [BLOCK_M] and the
accumulator [BLOCK_M, BLOCK_D], all fp32. Scores are in log2 units (log2(e) folded into
the scale by the callers) so the update uses exp2.
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
