# Flash decoding (split-KV): one new query token per sequence against a KV cache, GQA.
#
# Shapes:  q         [B, Hq, D]     unit stride along D (other strides free)
#          k_cache   [B, Hk, S, D]  unit stride along D
#          v_cache   [B, Hk, S, D]  unit stride along D
#          seq_lens  int32 [B]      keys 0..seq_lens[b]-1 are valid (0 -> zeros)
#          out       [B, Hq, D]     new contiguous tensor, dtype of q
# Pass 1:  grid (B * Hk, NUM_SPLITS).  Program (b * Hk + kv head, split) takes ALL Hq // Hk query
#          heads of the group as the rows of a [BLOCK_H >= 16, BLOCK_D] tile (K/V read from HBM
#          once) and keys [split * chunk, (split + 1) * chunk) below seq_lens[b], chunk =
#          cdiv(seq_lens[b], NUM_SPLITS) rounded up to BLOCK_N.  chunk is computed on the device,
#          so every length (also one far below the bound a CUDA graph was captured at) is spread
#          over all the splits.  NUM_SPLITS > 1: a non-empty split writes fp32 partials (running
#          max m in the log2 domain, sum l, unnormalised acc) to a workspace m, l: [B * Hq,
#          NUM_SPLITS], acc: [B * Hq, NUM_SPLITS, BLOCK_D].  NUM_SPLITS == 1: the program
#          normalises and writes out itself (no workspace, no pass 2).
# Merge, two kernels (pass 2): grid (B * Hq,): merges a row's non-empty splits, BLOCK_S at a
#          time.  On sm90+ it is launched with programmatic dependent launch: resident before
#          pass 1 ends, it waits (griddepcontrol.wait) before reading the workspace.
# Merge, one kernel (FUSED): after its partials, a non-empty split takes a ticket (atomic add,
#          acq_rel, gpu scope) on counter [b * Hk + kv head] of a persistent zeroed int32 buffer
#          per device; the split drawing ticket n_valid - 1 (n_valid = cdiv(seq_lens[b], chunk)
#          non-empty splits; split 0 when n_valid == 0) merges all heads of its group ([BLOCK_G,
#          BLOCK_S] partials a step), writes out and resets the counter to 0 for the next launch.
# Splits:  kernels.decode_splits, from B * Hk, the SM count and max_seq_len (default S); with tuning on, the
#          first call per (B, Hk, bound, group, D, dtype) times a few split counts x configs x both merges
#          (in a CUDA graph, at full length) and keeps the fastest (also on disk: tuning_cache).
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from kernels import tuning_cache
from kernels.checks import check_decode_inputs
from kernels.decode_splits import MAX_SPLITS, gpu_info, split_candidates, split_plan
from kernels.flash_common import chunk_len, merge_splits, online_softmax_pv, qk_scores, store_rows
from kernels.tickets import counters, last_ticket
from kernels.tuning import NoCandidate, fastest, fits_l2, graph_ms, tuning_suspended
from kernels.fastlaunch import fast
from kernels.pdl import enter as pdl_enter, opts as pdl_opts
from kernels.quant_x import round_tile

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_REDUCE_BLOCK_S = 4 if _INTERPRET else 64  # splits merged per step (at most)
_MERGE_REGS = 128  # fp32 partial elements per thread and step of the one-kernel merge
_SKIP = (OutOfResources, CompileTimeAssertionFailure, PTXASError)  # configs the GPU cannot run


def _with_fused(cfg: triton.Config, fused: bool = True) -> triton.Config:
    """cfg with the merge of > 1 splits chosen: FUSED (one kernel, ticket counters) or pass 2."""
    return triton.Config({**cfg.kwargs, "FUSED": fused}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _configs(fused: bool = False) -> list[triton.Config]:
    """Pass-1 configs with pass 2, and with fused the same again with the one-kernel merge."""
    shapes = [(16, 4, 3)] if _INTERPRET else [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 3),
                                              (32, 4, 2), (32, 4, 4)]
    base = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]
    return base + [_with_fused(c) for c in base] if fused else base


def _default_config(dtype: torch.dtype) -> triton.Config:
    """Untimed config (KERNELS_AUTOTUNE=0 / interpreter) that fits shared memory for dtype."""
    if _INTERPRET:
        return _configs()[0]
    return triton.Config({"BLOCK_N": 32 if dtype == torch.float32 else 64}, num_warps=4, num_stages=2)


@triton.jit
def _decode_block(acc, l_i, m_i, q_ptrs, k_base, v_base, stride_ks, stride_vs, n0, hi,
                  offs_n, offs_d, d_mask, D, qk_scale, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of all group heads with keys n0 .. n0 + BLOCK_N - 1 (< hi)."""
    offs = n0 + offs_n
    # q is re-read per block (L2 hits) under a loop-variant mask, so it is not hoisted out of the
    # loop and the pipeliner issues its copy together with the first K/V block, not before it
    q = tl.load(q_ptrs, mask=(offs_d < tl.where(n0 < hi, D, 0))[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter multiplies bf16 as raw uint16 bits
        q = q.to(tl.float32)
    kv_mask = (offs < hi)[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    s = qk_scores(q, k, IS_FP32, UPCAST)
    s = tl.where((offs < hi)[None, :], s * qk_scale, float("-inf"))
    return online_softmax_pv(acc, l_i, m_i, s, v, IS_FP32, UPCAST)


@triton.jit
def _attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, seqlen_ptr, out_ptr, ws_m_ptr, ws_l_ptr, ws_acc_ptr, cnt_ptr, xq_ptr, xd_ptr, xs_ptr,
    qk_scale, Hq, Hk, D, GROUP, NUM_SPLITS,
    sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, PDL_CHAIN: tl.constexpr = False, ROUND: tl.constexpr = False,
):
    pdl_enter(PDL_CHAIN)  # (kernels.pdl: the kernel before, then the next layer's; PDL: pass 2, below)
    b = tl.program_id(0) // Hk
    kvh = tl.program_id(0) % Hk
    split = tl.program_id(1)
    if PDL:  # pass 2 may become resident now; it waits for this grid before reading
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.load(seqlen_ptr + b)
    chunk = chunk_len(seq, NUM_SPLITS, BLOCK_N)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    heads = kvh * GROUP + tl.minimum(offs_h, GROUP - 1)  # padded rows repeat a real head
    q_ptrs = q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + offs_d[None, :]
    k_base = k_ptr + b.to(tl.int64) * sk_b + kvh * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + kvh * sv_h
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _decode_block(acc, l_i, m_i, q_ptrs, k_base, v_base, sk_s, sv_s, n0, hi,
                                      offs_n, offs_d, d_mask, D, qk_scale, IS_FP32, UPCAST)

    if DIRECT:  # the only split: normalise here (l == 0 for an empty sequence -> zeros)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        if ROUND:  # o_proj's x rounded to int8 here (kernels/quant_x.py's codes), not by a launch of its own
            round_tile(o, xq_ptr, xd_ptr, xs_ptr, b, kvh * GROUP, GROUP, Hq * D, BLOCK_H, BLOCK_D,
                       out_ptr.dtype.element_ty)
        store_rows(out_ptr, o, b, kvh * GROUP, GROUP, so_b, so_h, D, BLOCK_H, BLOCK_D)
    else:  # partials; an empty split (lo >= seq) writes nothing, the merge reads non-empty ones only
        h_mask = offs_h < tl.where(lo < seq, GROUP, 0)
        rows = (b * Hq + kvh * GROUP + offs_h).to(tl.int64) * NUM_SPLITS + split
        tl.store(ws_m_ptr + rows, m_i, mask=h_mask)
        tl.store(ws_l_ptr + rows, l_i, mask=h_mask)
        tl.store(ws_acc_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=h_mask[:, None])
        if FUSED:
            n_valid = tl.cdiv(seq, chunk)
            if last_ticket(cnt_ptr + tl.program_id(0), split, n_valid):
                tl.store(cnt_ptr + tl.program_id(0), 0)  # all tickets drawn: ready for the next launch
                o = merge_splits(ws_m_ptr, ws_l_ptr, ws_acc_ptr, b * Hq + kvh * GROUP, GROUP, n_valid,
                                 NUM_SPLITS, BLOCK_G, BLOCK_S, BLOCK_D)
                if ROUND:
                    round_tile(o, xq_ptr, xd_ptr, xs_ptr, b, kvh * GROUP, GROUP, Hq * D, BLOCK_G, BLOCK_D,
                               out_ptr.dtype.element_ty)
                store_rows(out_ptr, o, b, kvh * GROUP, GROUP, so_b, so_h, D, BLOCK_G, BLOCK_D)


@triton.jit
def _attention_decode_reduce_kernel(
    ws_m_ptr, ws_l_ptr, ws_acc_ptr, seqlen_ptr, out_ptr, xq_ptr, xd_ptr, xs_ptr, NUM_SPLITS, ALIGN, Hq, D,
    so_b, so_h, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr, ROUND: tl.constexpr = False,
):
    row = tl.program_id(0)
    b = row // Hq
    seq = tl.load(seqlen_ptr + b)  # written before pass 1 started: safe to read before the wait
    n_valid = tl.cdiv(seq, chunk_len(seq, NUM_SPLITS, ALIGN))  # splits holding >= 1 key
    if PDL:
        tl.extra.cuda.gdc_wait()
    o = merge_splits(ws_m_ptr, ws_l_ptr, ws_acc_ptr, row, 1, n_valid, NUM_SPLITS, 1, BLOCK_S, BLOCK_D)
    if ROUND:
        round_tile(o, xq_ptr, xd_ptr, xs_ptr, b, row % Hq, 1, Hq * D, 1, BLOCK_D, out_ptr.dtype.element_ty)
    store_rows(out_ptr, o, b, row % Hq, 1, so_b, so_h, D, 1, BLOCK_D)


def _launch(q, k_cache, v_cache, seq_lens, scale: float, splits: int, cfg: triton.Config,
            out: torch.Tensor, rounded: tuple | None = None) -> None:
    """Pass 1 (and pass 2 when splits > 1, unless merged in one kernel) with the given split count
    and config (FUSED in its kwargs: the one-kernel merge), into out; ``rounded``: (xq, steps, sums) buffers that
    also get out's rows rounded to int8 (:func:`attention_decode`'s ``rounded``)."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[1]
    block_h, block_d = max(16, triton.next_power_of_2(Hq // Hk)), max(16, triton.next_power_of_2(D))
    cnt = counters(q.device, B * Hk, "attention_decode") if splits > 1 and cfg.kwargs.get("FUSED") else None
    n = B * Hq * splits  # workspace, one allocation: acc [n, block_d] | m [n] | l [n]
    ws = torch.empty(n * (block_d + 2) if splits > 1 else 0, device=q.device, dtype=torch.float32)
    ws_acc, ws_m, ws_l = (out, out, out) if splits == 1 else (ws[: n * block_d], ws[n * block_d: -n], ws[-n:])
    pdl = splits > 1 and cnt is None and q.is_cuda and not _INTERPRET and gpu_info(q.device.index or 0)[1]
    block_s = min(triton.next_power_of_2(splits), _REDUCE_BLOCK_S)
    block_g = triton.next_power_of_2(Hq // Hk) if cnt is not None else 1
    merge_s = min(block_s, max(1, _MERGE_REGS * 32 * cfg.num_warps // (block_g * block_d)))
    xq, xd, xs = rounded if rounded is not None else (out, out, out)
    _attention_decode_launch[(B * Hk, splits)](
        q, k_cache, v_cache, seq_lens, out, ws_m, ws_l, ws_acc, seq_lens if cnt is None else cnt, xq, xd, xs,
        float(scale) * _LOG2E, Hq, Hk, D, Hq // Hk, splits, *q.stride()[:2], *k_cache.stride()[:3],
        *v_cache.stride()[:3], *out.stride()[:2], BLOCK_H=block_h, BLOCK_N=cfg.kwargs["BLOCK_N"],
        BLOCK_D=block_d, IS_FP32=q.dtype == torch.float32, UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        DIRECT=splits == 1, PDL=pdl, FUSED=cnt is not None, BLOCK_G=block_g, BLOCK_S=merge_s,
        ROUND=rounded is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_opts(q))
    if splits > 1 and cnt is None:
        _attention_decode_reduce_launch[(B * Hq,)](
            ws_m, ws_l, ws_acc, seq_lens, out, xq, xd, xs, splits, cfg.kwargs["BLOCK_N"], Hq, D, *out.stride()[:2],
            BLOCK_S=block_s, BLOCK_D=block_d, PDL=pdl, ROUND=rounded is not None,
            num_warps=8 if block_s * block_d >= 8192 else 4, **({"launch_pdl": True} if pdl else {}))


def _pairs(splits: list[int]) -> list[tuple[int, triton.Config]]:
    """Every (split count, config) the tuner times; the one-kernel merge only where splits > 1."""
    return [(s, c) for s in splits for c in _configs(fused=s > 1)]


def _tune(q, k_cache, v_cache, scale: float, max_len: int, candidates: list[int],
          timer=None) -> tuple[int, triton.Config] | None:
    """Time every (split count, config, merge) at full length; return the fastest (None: none ran).
    Default timer: CUDA-graph replays, cold (after an L2 flush) where the keys and values could
    stay in the L2 between calls, as a decode step reads them once."""
    B, Hq, D = q.shape
    if timer is None:
        kv_bytes = 2 * B * k_cache.shape[1] * max_len * D * q.element_size()
        timer = functools.partial(graph_ms, cold=fits_l2(kv_bytes, q.device))
    seq = torch.full((B,), max_len, device=q.device, dtype=torch.int32)  # not the warm-up's lengths
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    try:
        return fastest(_pairs(candidates), lambda sc: _launch(q, k_cache, v_cache, seq, scale, *sc, out), timer,
                       name="attention_decode", device=q.device, skip=_SKIP)
    except NoCandidate:
        return None


# (B, Hk, bound, group, D, dtype) -> (split count, config incl. FUSED); later calls skip the tuning
_TUNED: dict[tuple, tuple[int, triton.Config]] = {}


def _plan(q, k_cache, v_cache, scale: float, max_len: int) -> tuple[int, triton.Config]:
    B, Hq, D = q.shape
    Hk = k_cache.shape[1]
    key = (B, Hk, max_len, Hq // Hk, D, q.dtype)
    if key in _TUNED:
        return _TUNED[key]
    sms = gpu_info(q.device.index or 0)[0] if q.is_cuda else 16
    plan = (split_plan(sms, B, Hk, max_len), _default_config(q.dtype))
    if _INTERPRET or os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
        _TUNED[key] = plan
    elif tuning_suspended():  # untimed: a cached or shipped pick, else the default plan; not kept
        as_json = lambda p: [p[0], tuning_cache.config_to_json(p[1])]  # noqa: E731
        return tuning_cache.untimed_pick(q.device, "attention_decode", key,
                                         lambda: _pairs(split_candidates(sms, B, Hk, max_len)), plan, as_json)
    elif not torch.cuda.is_current_stream_capturing():  # cannot time inside a capture: default, untuned
        splits = split_candidates(sms, B, Hk, max_len)
        tune = functools.partial(_tune, q, k_cache, v_cache, scale, max_len, splits)
        as_json = lambda p: [p[0], tuning_cache.config_to_json(p[1])]  # noqa: E731
        plan = _TUNED[key] = tuning_cache.tuned(q.device, "attention_decode", key, _pairs(splits), tune,
                                                as_json) or plan
    return plan


def can_round(head_dim: int) -> bool:
    """Whether ``attention_decode(rounded=True)`` takes this head dim (a power of two >= 32: whole 32-column
    blocks per head, the tile as wide as a head)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, max_seq_len: int | None = None,
                     *, num_splits: int | None = None, fused: bool | None = None,
                     rounded: bool = False) -> torch.Tensor | tuple[torch.Tensor, tuple]:
    """Split-KV (flash-decoding) GQA attention of one query token per sequence.

    q: [B, Hq, D] (unit stride along D), k_cache/v_cache: [B, Hk, S, D],
    seq_lens: int32 [B] (keys 0..seq_lens[b]-1 valid, <= S; 0 gives zeros).
    max_seq_len: optional host-side bound on seq_lens that sizes the split count (default S;
    no device sync either way; lengths above it stay correct, just less parallel).
    num_splits: force the split count (1..MAX_SPLITS; tests, benchmarks) with the default config.
    fused: force the merge of > 1 splits: in pass 1 via ticket counters (True) or by pass 2
    (False); None: the plan's (forced num_splits: pass 2).
    Returns a new contiguous [B, Hq, D] tensor in q's dtype; with ``rounded`` (D a power of two >= 32) also its
    rows [B, Hq * D] rounded to int8 as :func:`kernels.quant_x.quantize_x` rounds them (the same codes, steps and
    sums), in the epilogue that writes them: o_proj's int8-x GEMV then needs no rounding launch.
    """
    check_decode_inputs(q, k_cache, v_cache, seq_lens)
    B, Hq, D = q.shape
    if rounded and not can_round(D):
        raise ValueError(f"attention_decode(rounded=True) needs a head dim that is a power of two >= 32, got {D}")
    S = k_cache.shape[2]
    max_len = S if max_seq_len is None else max(0, min(int(max_seq_len), S))
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    bufs = ((torch.empty((B, Hq * D // 4), device=q.device, dtype=torch.int32),
             torch.empty((B, Hq * D // 32), device=q.device, dtype=torch.float32),
             torch.empty((B, Hq * D // 32), device=q.device, dtype=torch.int32)) if rounded else None)
    if B == 0:
        return (out, bufs) if rounded else out
    if num_splits is not None:
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
        splits, cfg = num_splits, _default_config(q.dtype)
    else:
        splits, cfg = _plan(q, k_cache, v_cache, scale, max_len)
    if fused is not None:
        cfg = _with_fused(cfg, fused)
    _launch(q, k_cache, v_cache, seq_lens, scale, splits, cfg, out, bufs)
    return (out, bufs) if rounded else out


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


# launched through kernels.fastlaunch
_attention_decode_launch = fast(_attention_decode_kernel)
_attention_decode_reduce_launch = fast(_attention_decode_reduce_kernel)
