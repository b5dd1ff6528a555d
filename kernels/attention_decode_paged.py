# Flash decoding through a block table: one query token per sequence against a paged KV cache, GQA.
#
# Shapes:  q            [B, Hq, D]         unit stride along D
#          k_blocks     [N, Hk, BS, D]     unit stride along D; BS (tokens per block) a power of two >= 16
#          v_blocks     [N, Hk, BS, D]
#          block_tables int32 [B, M]       block of positions [j * BS, (j + 1) * BS) of sequence b
#          seq_lens     int32 [B]          keys 0..seq_lens[b]-1 valid, <= M * BS (0 -> zeros)
#          out          [B, Hq, D]         new contiguous tensor, dtype of q
# Pass 1:  grid (B * Hk, NUM_SPLITS), as kernels/attention_decode.py: a program takes the whole GQA
#          group of one KV head as the rows of a tile and the keys of its split, whose chunk is a
#          multiple of BS, so each BLOCK_N = BS step is one block: its id is read from the table and
#          the tile is loaded from that block. One split writes out itself; more write fp32 partials
#          that attention_decode's pass-2 kernel merges (same workspace layout).
# Splits:  >= 2 programs per SM, at most one per block of the longest sequence (no tuning yet).
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.attention_decode import _attention_decode_reduce_kernel, _decode_block
from kernels.decode_splits import MAX_SPLITS
from kernels.flash_common import chunk_len, store_rows

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_REDUCE_BLOCK_S = 4 if _INTERPRET else 64


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seqlen_ptr, out_ptr, ws_m_ptr, ws_l_ptr, ws_acc_ptr,
    qk_scale, Hq, Hk, D, GROUP, NUM_SPLITS, stride_tb,
    sq_b, sq_h, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, so_b, so_h,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr, DIRECT: tl.constexpr,
):
    b = tl.program_id(0) // Hk
    kvh = tl.program_id(0) % Hk
    split = tl.program_id(1)
    seq = tl.load(seqlen_ptr + b)
    chunk = chunk_len(seq, NUM_SPLITS, BLOCK_N)  # a multiple of the block size
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    heads = kvh * GROUP + tl.minimum(offs_h, GROUP - 1)  # padded rows repeat a real head
    q_ptrs = q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + offs_d[None, :]
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        block = tl.load(table_ptr + b.to(tl.int64) * stride_tb + n0 // BLOCK_N).to(tl.int64)
        k_base = k_ptr + block * sk_n + kvh * sk_h
        v_base = v_ptr + block * sv_n + kvh * sv_h
        acc, l_i, m_i = _decode_block(acc, l_i, m_i, q_ptrs, k_base, v_base, sk_s, sv_s, 0, hi - n0,
                                      offs_n, offs_d, d_mask, D, qk_scale, IS_FP32, UPCAST)
    if DIRECT:
        store_rows(out_ptr, acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], b, kvh * GROUP, GROUP,
                   so_b, so_h, D, BLOCK_H, BLOCK_D)
    else:  # partials of a non-empty split, in attention_decode's workspace layout
        h_mask = offs_h < tl.where(lo < seq, GROUP, 0)
        rows = (b * Hq + kvh * GROUP + offs_h).to(tl.int64) * NUM_SPLITS + split
        tl.store(ws_m_ptr + rows, m_i, mask=h_mask)
        tl.store(ws_l_ptr + rows, l_i, mask=h_mask)
        tl.store(ws_acc_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=h_mask[:, None])


def _check(q, k_blocks, v_blocks, block_tables, seq_lens) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [B, Hq, D] with unit stride along D, got {tuple(q.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}; expected bf16, fp16 or fp32")
    B, Hq, D = q.shape
    for name, c in (("k_blocks", k_blocks), ("v_blocks", v_blocks)):
        if c.dim() != 4 or c.shape[3] != D or c.dtype != q.dtype or c.device != q.device or c.stride(3) != 1:
            raise ValueError(f"{name} must be [N, Hk, BS, D={D}] {q.dtype} on {q.device} with unit stride "
                             f"along D, got {tuple(c.shape)} {c.dtype} on {c.device}")
    if v_blocks.shape != k_blocks.shape:
        raise ValueError(f"k_blocks {tuple(k_blocks.shape)} and v_blocks {tuple(v_blocks.shape)} differ")
    Hk, bs = k_blocks.shape[1], k_blocks.shape[2]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"Hq={Hq} must be a multiple of Hk={Hk}")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block size {bs} must be a power of two >= 16 (one tile per block)")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D={D} unsupported (1..256)")
    for name, t, dims in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1)):
        if t.dim() != dims or t.shape[0] != B or t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be a {dims}-D int32 tensor with B={B} rows on {q.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must have unit stride along its last dim")


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_decode_paged(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None) -> torch.Tensor:
    """Split-KV GQA attention of one query token per sequence over blocks named by ``block_tables``.

    See the file header for shapes. ``seq_lens[b]`` must not exceed ``M * BS`` and every table entry
    below ``cdiv(seq_lens[b], BS)`` must name a block in ``[0, N)`` (not checked: no device sync).
    ``num_splits`` forces the split count (tests). Returns a new contiguous [B, Hq, D] tensor.
    """
    _check(q, k_blocks, v_blocks, block_tables, seq_lens)
    B, Hq, D = q.shape
    Hk, bs = k_blocks.shape[1], k_blocks.shape[2]
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    if B == 0:
        return out
    cap = max(1, min(MAX_SPLITS, block_tables.shape[1]))
    if num_splits is None:
        sms = _sms(q.device.index or 0) if q.is_cuda else 16
        num_splits = max(1, min(triton.cdiv(2 * sms, B * Hk), cap))
    elif not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    block_h, block_d = max(16, triton.next_power_of_2(Hq // Hk)), max(16, triton.next_power_of_2(D))
    n = B * Hq * num_splits
    ws = torch.empty(n * (block_d + 2) if num_splits > 1 else 0, device=q.device, dtype=torch.float32)
    ws_acc, ws_m, ws_l = (out, out, out) if num_splits == 1 else (ws[: n * block_d], ws[n * block_d: -n], ws[-n:])
    _paged_decode_kernel[(B * Hk, num_splits)](
        q, k_blocks, v_blocks, block_tables, seq_lens, out, ws_m, ws_l, ws_acc, float(scale) * _LOG2E,
        Hq, Hk, D, Hq // Hk, num_splits, block_tables.stride(0), *q.stride()[:2], *k_blocks.stride()[:3],
        *v_blocks.stride()[:3], *out.stride()[:2], BLOCK_H=block_h, BLOCK_N=bs, BLOCK_D=block_d,
        IS_FP32=q.dtype == torch.float32, UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        DIRECT=num_splits == 1, num_warps=4, num_stages=2)
    if num_splits > 1:
        block_s = min(triton.next_power_of_2(num_splits), _REDUCE_BLOCK_S)
        _attention_decode_reduce_kernel[(B * Hq,)](
            ws_m, ws_l, ws_acc, seq_lens, out, out, out, out, num_splits, bs, Hq, D, *out.stride()[:2],
            BLOCK_S=block_s, BLOCK_D=block_d, PDL=False, num_warps=4)
    return out


def attention_decode_paged_ref(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 torch reference: gather each sequence's blocks in order, then plain softmax attention."""
    B, Hq, D = q.shape
    Hk, bs = k_blocks.shape[1], k_blocks.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // bs)].long()
        k = k_blocks[blocks].float().permute(1, 0, 2, 3).reshape(Hk, -1, D)[:, :n].repeat_interleave(Hq // Hk, 0)
        v = v_blocks[blocks].float().permute(1, 0, 2, 3).reshape(Hk, -1, D)[:, :n].repeat_interleave(Hq // Hk, 0)
        s = torch.einsum("hd,hnd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
    return out
