# Causal flash attention for prefill over a KV cache, with GQA and ragged batches.
#
# Shapes:  q        [B, T, Hq, D]  any strides with unit stride along D (e.g. a
#                                  slice of a fused qkv projection output)
#          k_cache  [B, Hk, S, D]  unit stride along D (other strides free)
#          v_cache  [B, Hk, S, D]  unit stride along D
#          start_pos int32 [B]     absolute position of query row t=0
#          q_lens    int32 [B]     valid query rows; rows t >= q_lens[b] -> zeros
#          out      [B, T, Hq, D]  new contiguous tensor, dtype of q
# Semantics: query t of sequence b sits at p = start_pos[b] + t and attends to
#          keys j <= p; keys j < start_pos[b] + q_lens[b] must already be in the
#          cache.  Hq % Hk == 0, kv head = q head // (Hq // Hk).
# Varlen:  attention_prefill_varlen: sequences' rows one after another in a flat q [R, Hq, D] (a pass's
#          stacked prompt slices), each with its own row span and cache row, in one launch (VARLEN).
# Kernel:  one program per (BLOCK_M query rows, batch, q head); online softmax in
#          fp32 with exp2 (log2(e) folded into the scale).  Key blocks entirely
#          below the first query's position run unmasked; the diagonal runs
#          masked.  D is padded to a power of two (>= 16) with masks.
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels import tuning_cache
from kernels.checks import check_kv_cache
from kernels.flash_common import online_softmax_pv, qk_scores
from kernels.tuning import bench_ms, fastest, tuning_suspended
from kernels.fastlaunch import fast

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})]  # interpreted: fewer programs, still several blocks
    shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
              (128, 32, 4, 4), (64, 128, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


def _default_config(dtype: torch.dtype) -> triton.Config:
    """Untimed config (KERNELS_AUTOTUNE=0 / interpreter) that fits shared memory for dtype."""
    if _INTERPRET:
        return _configs()[0]
    if dtype == torch.float32:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    # 64 x 64 at 4 warps: the sm_90 build spills nothing at head dim 128 (185 registers), where 128 x 64 at 4
    # warps (the default before) spilled 328 bytes a thread (Triton 3.9's build, strides 16-aligned as launched;
    # tests/test_kernels_attention_prefill_sm90.py); untuned calls are short groups (<= 64 rows) anyway
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)


@triton.jit
def _prefill_block(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, n0,
                   offs_n, offs_d, d_mask, q_pos, kv_lim, qk_scale,
                   MASKED: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """One BLOCK_N key block of the online-softmax update."""
    offs = n0 + offs_n
    kv_mask = d_mask[None, :]
    if MASKED:
        kv_mask = kv_mask & (offs < kv_lim)[:, None]
    k = tl.load(k_base + offs[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    s = qk_scores(q, k, IS_FP32, UPCAST)
    s = s * qk_scale
    if MASKED:
        visible = (offs[None, :] <= q_pos[:, None]) & (offs < kv_lim)[None, :]
        s = tl.where(visible, s, float("-inf"))
    return online_softmax_pv(acc, l_i, m_i, s, v, IS_FP32, UPCAST)


@triton.jit
def _attention_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, start_ptr, qlen_ptr, qrow_ptr, crow_ptr, blk_ptr,
    qk_scale, T, Hq, D, S, GROUP, NSEQ,
    sq_b, sq_t, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_t, so_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_FP32: tl.constexpr, UPCAST: tl.constexpr, VARLEN: tl.constexpr = False, BLOCKS: tl.constexpr = False,
):
    if BLOCKS:  # program (entry, head): the table's entry is sequence * 65536 + its row block (-1: no work)
        e = tl.load(blk_ptr + tl.program_id(0))
        real = e >= 0
        e = tl.maximum(e, 0)
        b = e >> 16
        pid_m = e & 65535
        h = tl.program_id(1)
    else:
        real = True
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (diagonal-heavy) blocks first
        b = tl.program_id(1) // Hq
        h = tl.program_id(1) % Hq
    kvh = h // GROUP
    start = tl.load(start_ptr + b)
    if VARLEN:  # sequence b: rows qrow[b] .. + qrow[NSEQ + b] of q / out (its span), its keys cache row crow[b]
        row0 = tl.load(qrow_ptr + b).to(tl.int64)
        n_rows = tl.where(real, tl.load(qrow_ptr + NSEQ + b), 0)
        q_off = row0 * sq_t
        o_off = row0 * so_t
        c_row = tl.load(crow_ptr + b).to(tl.int64)
    else:
        q_off = b.to(tl.int64) * sq_b
        o_off = b.to(tl.int64) * so_b
        c_row = b.to(tl.int64)
        n_rows = T
    qlen = tl.minimum(tl.load(qlen_ptr + b), n_rows)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_ptrs = q_ptr + q_off + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < n_rows)[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = start + offs_m

    rows = tl.minimum(tl.maximum(qlen - m0, 0), BLOCK_M)  # valid query rows in this block
    kv_lim = tl.minimum(start + qlen, S)
    hi = tl.where(rows > 0, tl.minimum(start + m0 + rows, kv_lim), 0)
    full_end = tl.where(rows > 0, ((start + m0) // BLOCK_N) * BLOCK_N, 0)
    full_end = tl.minimum(full_end, hi)

    k_base = k_ptr + c_row * sk_b + kvh * sk_h
    v_base = v_ptr + c_row * sv_b + kvh * sv_h
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _prefill_block(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, n0,
                                       offs_n, offs_d, d_mask, q_pos, kv_lim, qk_scale,
                                       False, IS_FP32, UPCAST)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _prefill_block(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, n0,
                                       offs_n, offs_d, d_mask, q_pos, kv_lim, qk_scale,
                                       True, IS_FP32, UPCAST)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where((offs_m < qlen)[:, None], out, 0.0)
    o_ptrs = out_ptr + o_off + h * so_h + offs_m[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m < n_rows)[:, None] & d_mask[None, :])


# (T bucket, BLOCK_D, group, dtype) -> tuned config
_TUNED: dict[tuple, triton.Config] = {}


def _launch(cfg: triton.Config, args: tuple, consts: dict, grid_m: int, grid_bh: int) -> None:
    """``grid_m`` rows of blocks (a block table's entries: ``consts["BLOCKS"]``) by ``grid_bh`` programs."""
    rows = grid_m if consts["BLOCKS"] else triton.cdiv(grid_m, cfg.kwargs["BLOCK_M"])
    _attention_prefill_launch[(rows, grid_bh)](
        *args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _untimed_config(key: tuple, q: torch.Tensor) -> triton.Config | None:
    """A config for a shape not tuned in this process, without timing: the default (interpreter,
    KERNELS_AUTOTUNE=0: kept; inside kernels.tuning.untuned(): not kept) or an earlier process's
    pick (kernels.tuning_cache: kept). None: time the candidates now."""
    if _INTERPRET or os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
        _TUNED[key] = _default_config(q.dtype)
        return _TUNED[key]
    cfg = tuning_cache.choose(q.device, "attention_prefill", key, _configs())
    if cfg is not None:
        _TUNED[key] = cfg
    elif tuning_suspended():
        return _default_config(q.dtype)
    return cfg


def _check_lengths(name: str, t: torch.Tensor, q: torch.Tensor, B: int) -> None:
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{name} must be a 1-D int32 tensor of length B={B}, got {tuple(t.shape)}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"device mismatch: {name} on {t.device}, q on {q.device}")


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      start_pos: torch.Tensor, q_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA flash attention of new queries against a KV cache.

    q: [B, T, Hq, D] (unit stride along D), k_cache/v_cache: [B, Hk, S, D],
    start_pos/q_lens: int32 [B].  Query t of sequence b (absolute position
    start_pos[b] + t) attends to cache keys j <= start_pos[b] + t; rows
    t >= q_lens[b] are written as zeros.  Returns a new contiguous
    [B, T, Hq, D] tensor in q's dtype (bf16/fp16/fp32; fp32 softmax).
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got shape {tuple(q.shape)}")
    B, T, Hq, D = q.shape
    _check_operands(q, k_cache, v_cache, B)
    _check_lengths("start_pos", start_pos, q, B)
    _check_lengths("q_lens", q_lens, q, B)
    out = torch.empty((B, T, Hq, D), device=q.device, dtype=q.dtype)
    if B == 0 or T == 0:
        return out
    _run(q, k_cache, v_cache, out, start_pos, q_lens, scale, T, B, q.stride()[:3], out.stride()[:3])
    return out


def attention_prefill_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             start_pos: torch.Tensor, q_lens: torch.Tensor, seq_rows: torch.Tensor,
                             cache_rows: torch.Tensor, max_rows: int, scale: float,
                             blocks: torch.Tensor | None = None, block_m: int = 0) -> torch.Tensor:
    """:func:`attention_prefill` for several sequences whose query rows lie one after another in a flat
    q [R, Hq, D] (the stacked prompt slices of a pass), in one launch: sequence b's rows are
    ``seq_rows[1, b]`` rows from row ``seq_rows[0, b]`` (int32 [2, B]; ``max_rows`` their most), its keys and
    values row ``cache_rows[b]`` (int32 [B]) of k_cache / v_cache [C, Hk, S, D]; start_pos / q_lens as
    there (rows past q_lens[b] of its span written as zeros). Returns [R, Hq, D] in q's dtype; rows outside
    every span are left unwritten. The caller keeps ``max_rows`` >= every span and the cache rows < C (device
    values, not checked here: a pass lays them out once, engine/varlen.py).

    ``blocks`` (int32 [NB], with ``block_m``): the launch's row blocks as a table, entry ``b * 65536 + m`` for
    rows ``m * block_m ..`` of sequence b (-1: none), one program per entry and head, in place of a program per
    sequence, ``max_rows`` block and head: a captured launch padded to many sequences and rows
    (engine/prompt_graphs.py) then costs what its real blocks do. ``block_m`` must be :func:`varlen_block_m`'s."""
    if q.dim() != 3:
        raise ValueError(f"q must be [R, Hq, D], got shape {tuple(q.shape)}")
    B = start_pos.shape[0] if start_pos.dim() == 1 else -1
    _check_operands(q, k_cache, v_cache, k_cache.shape[0] if k_cache.dim() == 4 else -1)
    _check_lengths("start_pos", start_pos, q, B)
    _check_lengths("q_lens", q_lens, q, B)
    _check_lengths("cache_rows", cache_rows, q, B)
    if seq_rows.shape != (2, B) or seq_rows.dtype != torch.int32 or not seq_rows.is_contiguous() \
            or seq_rows.device != q.device:
        raise ValueError(f"seq_rows must be a contiguous int32 [2, {B}] tensor on {q.device}, "
                         f"got {tuple(seq_rows.shape)} {seq_rows.dtype}")
    if blocks is not None:
        if blocks.dim() != 1 or blocks.dtype != torch.int32 or not blocks.is_contiguous() or blocks.device != q.device:
            raise ValueError(f"blocks must be a contiguous 1-D int32 tensor on {q.device}, got "
                             f"{tuple(blocks.shape)} {blocks.dtype}")
        want = varlen_block_m(max_rows, q.shape[-1], q.shape[-2] // k_cache.shape[1], q.dtype)
        if block_m != want:
            raise ValueError(f"block_m {block_m} is not the launch's block of rows ({want}): lay the table out "
                             "with varlen_block_m's")
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if B == 0 or max_rows <= 0 or q.shape[0] == 0 or (blocks is not None and blocks.numel() == 0):
        return out
    _run(q, k_cache, v_cache, out, start_pos.contiguous(), q_lens.contiguous(), scale, max_rows, B,
         (0, *q.stride()[:2]), (0, *out.stride()[:2]), (seq_rows, cache_rows.contiguous(), blocks))
    return out


def varlen_block_m(max_rows: int, D: int, group: int, dtype: torch.dtype) -> int:
    """The rows a program of :func:`attention_prefill_varlen` takes for these shapes: its tuned config's, where
    this process has one, else the untimed default's (a block table laid out before the shape's first call may
    meet another pick: lay it out after)."""
    cfg = _TUNED.get(_key(max_rows, D, group, dtype)) or _default_config(dtype)
    return cfg.kwargs["BLOCK_M"]


def _key(T: int, D: int, group: int, dtype: torch.dtype) -> tuple:
    """The tuning key of ``T`` query rows (the longest span's): (T bucket, BLOCK_D, GQA group, dtype)."""
    return min(triton.next_power_of_2(T), 4096), max(16, triton.next_power_of_2(D)), group, dtype


def _check_operands(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, B: int) -> None:
    """q's dtype, head dim and strides; the caches' shapes against q's and the batch ``B``."""
    Hq, D = q.shape[-2], q.shape[-1]
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected bf16, fp16 or fp32")
    if q.stride(-1) != 1:
        raise ValueError("q must have unit stride along D (last dim)")
    if D > 256 or D < 1:
        raise ValueError(f"head dim D={D} unsupported (1..256)")
    check_kv_cache("k_cache", k_cache, q, B, D)
    check_kv_cache("v_cache", v_cache, q, B, D)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    Hk = k_cache.shape[1]
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hk={Hk}")


def _run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, start_pos: torch.Tensor,
         q_lens: torch.Tensor, scale: float, T: int, B: int, q_strides: tuple, o_strides: tuple,
         varlen: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None) -> None:
    """Launch with the tuned config for these shapes (tuning them first where none is known)."""
    Hq, D = q.shape[-2], q.shape[-1]
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    key = _key(T, D, Hq // Hk, q.dtype)
    block_d = key[1]
    rows, crows, blocks = varlen if varlen is not None else (start_pos, start_pos, None)  # unread without VARLEN
    args = (q, k_cache, v_cache, out, start_pos, q_lens, rows, crows, start_pos if blocks is None else blocks,
            float(scale) * _LOG2E, T, Hq, D, S, Hq // Hk, B,
            *q_strides, *k_cache.stride()[:3], *v_cache.stride()[:3], *o_strides)
    consts = dict(BLOCK_D=block_d, IS_FP32=q.dtype == torch.float32,
                  UPCAST=_INTERPRET and q.dtype == torch.bfloat16, VARLEN=varlen is not None,
                  BLOCKS=blocks is not None)
    # the one-launch form shares the plain form's picks (its row bucket: the longest span's): the warm-up's passes
    # tune them group by group and a served pass never tunes; its grid holds more sequences (not timed apart).
    # With a block table: the config whose BLOCK_M the table was laid out for (varlen_block_m), never tuned here
    grid = (blocks.numel(), Hq) if blocks is not None else (T, B * Hq)
    run = functools.partial(_launch, args=args, consts=consts, grid_m=grid[0], grid_bh=grid[1])
    cfg = _TUNED.get(key) or (_default_config(q.dtype) if blocks is not None else _untimed_config(key, q))
    if cfg is None:  # time the candidates (compiled in parallel first); keep the pick here and on disk
        tune = functools.partial(fastest, _configs(), run, bench_ms, name="attention_prefill", device=q.device)
        picked = tuning_cache.safe_tune("attention_prefill", key, tune)  # None: the tuning failed (logged)
        cfg = _TUNED[key] = picked or _default_config(q.dtype)
        if picked is not None:
            tuning_cache.store(q.device, "attention_prefill", key, tuning_cache.config_to_json(cfg))
    run(cfg)


def attention_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          start_pos: torch.Tensor, q_lens: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """fp32 torch reference for :func:`attention_prefill` with an explicit mask."""
    B, T, Hq, D = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    k = k_cache.float().repeat_interleave(Hq // Hk, dim=1)  # [B, Hq, S, D]
    v = v_cache.float().repeat_interleave(Hq // Hk, dim=1)
    out = torch.zeros(B, T, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        start, n = int(start_pos[b]), min(int(q_lens[b]), T)
        if n == 0:
            continue
        kv = min(start + n, S)
        pos = start + torch.arange(n, device=q.device)
        keys = torch.arange(kv, device=q.device)
        mask = keys[None, :] <= pos[:, None]  # [n, kv]
        s = torch.einsum("thd,hsd->hts", q[b, :n].float(), k[b, :, :kv]) * scale
        s = s.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[b, :n] = torch.einsum("hts,hsd->thd", p, v[b, :, :kv])
    return out


_attention_prefill_launch = fast(_attention_prefill_kernel)  # launched through kernels.fastlaunch
