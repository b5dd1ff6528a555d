# Rotary position embedding, HF "rotate half" convention, applied in place to q and k.
#
# Shapes:  q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [P, D//2] fp32, positions [B, T] int32/int64.
# Strides: q and k may be arbitrary strided views over B, T and heads (e.g. slices of a fused
#          qkv projection output [B, T, (Hq+2Hk)*D] viewed as heads); their last dim must be
#          contiguous.  cos/sin must be contiguous.  positions may be strided.
# Dtypes:  q, k in {bf16, fp16, fp32} (same dtype); rotation math in fp32, stored in q's dtype.
# Math:    for i < D/2, with c = cos[pos, i], s = sin[pos, i]:
#            out[i] = x[i] * c - x[i + D/2] * s ;  out[i + D/2] = x[i + D/2] * c + x[i] * s
#          Positions are assumed valid (0 <= pos < P); table loads are masked, and an
#          out-of-range position leaves the token unrotated instead of reading out of bounds.
# Grid:    (cdiv(B*T, BLOCK_T), cdiv(Hq+Hk, BLOCK_H)) over one head axis (q's Hq heads, then k's
#          Hk; each row's pointer is picked per head): a program rotates BLOCK_T consecutive
#          tokens (flattened over B and T; the last program masks the tail) x BLOCK_H heads as
#          [BLOCK_T, BLOCK_H, D/2] tiles of 16-byte vectors, no lanes lost padding Hq and Hk
#          apart (28 + 4 heads: one 32-head tile).  q/k loads are issued before the position ->
#          cos/sin gather so the latencies overlap; table rows are read once per head block.
# Tuning:  heuristic (_launch_shape: the largest head block padding Hq+Hk by <= 1/4, ~32 KB of
#          q/k per program, >= 2 programs per SM) when KERNELS_AUTOTUNE=0, off CUDA, in a graph
#          capture or kernels.tuning.untuned() (not cached).  Otherwise the first call per
#          (next_pow2(B*T), Hq, Hk, D, dtype) compiles (BLOCK_T, BLOCK_H, num_warps) candidates in
#          parallel, times them by CUDA-graph replay on zeroed scratch laid out like q/k (never the
#          caller's tensors; past _SCRATCH_BYTES, fewer tokens) through kernels.tuning.fastest;
#          the fastest is kept (also on disk).
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from kernels import tuning_cache
from kernels.checks import check_device
from kernels.tuning import NoCandidate, fastest, graph_ms, tuning_suspended
from kernels.fastlaunch import fast

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
_TILE_BYTES = 32768  # q/k bytes a program aims to hold (heuristic)
_SCRATCH_BYTES = 64 << 20  # largest q/k span the tuner copies; longer inputs are timed on fewer tokens
_SKIP = (OutOfResources, CompileTimeAssertionFailure, PTXASError)  # configs the GPU cannot run


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr,
    N_TOK, T, HQ, HK, P,
    sqb, sqt, sqh, skb, skt, skh, spb, spt,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # int32 division, int64 offsets
    tok_mask = tok < N_TOK
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # head j: q head j, or k head j - HQ
    q_row = q_ptr + (b * sqb + t * sqt)[:, None] + (j.to(tl.int64) * sqh)[None, :]
    k_row = k_ptr + (b * skb + t * skt)[:, None] + ((j - HQ).to(tl.int64) * skh)[None, :]
    row = tl.where((j < HQ)[None, :], q_row, k_row)  # [BLOCK_T, BLOCK_H]; unused side never read
    d = tl.arange(0, BLOCK_D)
    ptrs = row[:, :, None] + d[None, None, :]
    mask = (tok_mask[:, None] & (j < HQ + HK)[None, :])[:, :, None] & (d < HALF)[None, None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    pos = tl.load(pos_ptr + b * spb + t * spt, mask=tok_mask, other=0).to(tl.int64)
    # an out-of-range position reads c = 1, s = 0: the token stays unrotated
    tab_mask = (tok_mask & (pos >= 0) & (pos < P))[:, None] & (d < HALF)[None, :]
    tab = pos[:, None] * HALF + d[None, :]
    c = tl.load(cos_ptr + tab, mask=tab_mask, other=1.0, eviction_policy="evict_last")[:, None, :]
    s = tl.load(sin_ptr + tab, mask=tab_mask, other=0.0, eviction_policy="evict_last")[:, None, :]
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptrs, (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _block_h(heads: int) -> int:
    """The largest power-of-two head block that pads ``heads`` (Hq + Hk) by at most 1/4."""
    bh = triton.next_power_of_2(heads)
    while bh > 1 and triton.cdiv(heads, bh) * bh * 4 > heads * 5:
        bh //= 2
    return bh


def _launch_shape(n_tok: int, heads: int, block_d: int, elem: int, sms: int) -> tuple[int, int, int]:
    """Heuristic (BLOCK_T, BLOCK_H, num_warps): ~_TILE_BYTES of q/k per program, >= 2 programs per SM."""
    bh = _block_h(heads)
    tile = bh * 2 * block_d  # elements of one token's q/k tile
    progs_h = triton.cdiv(heads, bh)
    block_t = min(_prev_pow2(_TILE_BYTES // (tile * elem)), _prev_pow2(n_tok * progs_h // (2 * sms)))
    return block_t, bh, min(16, max(2, _prev_pow2(block_t * tile // 1024)))


def _candidates(n_tok: int, heads: int, block_d: int, elem: int, sms: int) -> list[tuple[int, int, int]]:
    """The heuristic, then (BLOCK_T, BLOCK_H, warps) around it giving each thread one 16-byte
    vector to 32 elements per half tile (fewer idles lanes, more spills registers)."""
    cands = [_launch_shape(n_tok, heads, block_d, elem, sms)]
    bh0 = cands[0][1]
    for bh in sorted({bh0, max(1, bh0 // 2)}, reverse=True):
        for bt in (1, 2, 4, 8):
            for warps in (4, 8):
                per_thread = bt * bh * block_d // (32 * warps)
                if (bt <= triton.next_power_of_2(n_tok) and 16 // elem <= per_thread <= 32
                        and (bt, bh, warps) not in cands):
                    cands.append((bt, bh, warps))
    return cands


def _launch(q, k, cos, sin, positions, cfg: tuple[int, int, int]) -> None:
    b, t, hq, d = q.shape
    hk = k.shape[2]
    block_t, block_h, warps = cfg
    grid = (triton.cdiv(b * t, block_t), triton.cdiv(hq + hk, block_h))
    _rope_launch[grid](
        q, k, cos, sin, positions,
        b * t, t, hq, hk, cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        positions.stride(0), positions.stride(1),
        HALF=d // 2, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2),
        num_warps=warps,
    )


def _spans(*xs: torch.Tensor) -> dict[int, tuple[int, int]]:
    """Storage address -> [first, last + 1) element offsets the views ``xs`` of it reach."""
    spans: dict[int, tuple[int, int]] = {}
    for x in xs:
        lo = x.storage_offset()
        hi = lo + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1 if x.numel() else lo
        old = spans.setdefault(x.untyped_storage().data_ptr(), (lo, hi))
        spans[x.untyped_storage().data_ptr()] = (min(old[0], lo), max(old[1], hi))
    return spans


def _scratch_views(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Views of fresh memory with the sizes, strides and relative offsets of ``xs`` (views of one
    storage share one buffer laid out like their span; addresses keep their value mod 16 bytes)."""
    spans, bufs, views = _spans(*xs), {}, []
    for x in xs:
        key, esize = x.untyped_storage().data_ptr(), x.element_size()
        lo, hi = spans[key]
        shift = (key + lo * esize) % 16 // esize
        if key not in bufs:
            bufs[key] = torch.zeros(hi - lo + 16 // esize, dtype=x.dtype, device=x.device)
        views.append(bufs[key].as_strided(x.shape, x.stride(), shift + x.storage_offset() - lo))
    return views


def _tune(q, k, cos, sin, positions, cands: list[tuple[int, int, int]], timer=None):
    """Time every candidate on scratch copies of q/k; the fastest (None: none could run)."""
    span = sum(hi - lo for lo, hi in _spans(q, k).values()) * q.element_size()
    if span > _SCRATCH_BYTES:  # time on the leading tokens of one sequence: still a long grid
        t = max(1, min(q.shape[1], q.shape[0] * q.shape[1] * _SCRATCH_BYTES // span))
        q, k, positions = q[:1, :t], k[:1, :t], positions[:1, :t]
    sq, sk = _scratch_views(q, k)
    try:
        return fastest(cands, lambda c: _launch(sq, sk, cos, sin, positions, c), timer or graph_ms,
                       name="rope", device=q.device, skip=_SKIP)
    except NoCandidate:
        return None


# (next_pow2(B*T), Hq, Hk, D, dtype) -> (BLOCK_T, BLOCK_H, num_warps); later calls skip the tuning
_TUNED: dict[tuple, tuple[int, int, int]] = {}


def _tunable(q: torch.Tensor) -> bool:
    """Timing is possible and wanted: on CUDA, outside a graph capture and kernels.tuning.untuned(),
    KERNELS_AUTOTUNE != 0."""
    return (q.is_cuda and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing() and not tuning_suspended())


def _plan(q, k, cos, sin, positions) -> tuple[int, int, int]:
    b, t, hq, d = q.shape
    hk = k.shape[2]
    key = (triton.next_power_of_2(b * t), hq, hk, d, q.dtype)
    if key in _TUNED:
        return _TUNED[key]
    sms = _num_sms(q.device.index or 0) if q.is_cuda else 1
    args = (b * t, hq + hk, triton.next_power_of_2(d // 2), q.element_size(), sms)
    if not _tunable(q):  # a cached or shipped pick where timing is suspended, else the heuristic; not kept
        pick = tuning_cache.untimed_pick(q.device, "rope", key, lambda: _candidates(*args), None, list) \
            if tuning_suspended() else None
        return tuple(pick) if pick is not None else _launch_shape(*args)
    cands = _candidates(*args)
    tune = functools.partial(_tune, q, k, cos, sin, positions, cands)
    _TUNED[key] = tuning_cache.tuned(q.device, "rope", key, cands, tune, list) or _launch_shape(*args)
    return _TUNED[key]


def _validate(q, k, cos, sin, positions) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope_: q and k must be 4-D [B, T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, t, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"apply_rope_: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, T or D")
    if d % 2 != 0:
        raise ValueError(f"apply_rope_: head_dim must be even, got {d}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"apply_rope_: q/k must share a float dtype, got {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"apply_rope_: last dim of q/k must be contiguous, got {q.stride()}, {k.stride()}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[1] != d // 2 or tab.dtype != torch.float32:
            raise ValueError(f"apply_rope_: {name} must be fp32 [P, {d // 2}], got {tab.dtype} {tuple(tab.shape)}")
        if not tab.is_contiguous():
            raise ValueError(f"apply_rope_: {name} must be contiguous")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope_: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if positions.shape != (b, t) or positions.dtype not in _INT_DTYPES:
        raise ValueError(
            f"apply_rope_: positions must be int32/int64 [{b}, {t}], got {positions.dtype} {tuple(positions.shape)}"
        )
    check_device(q, k, cos, sin, positions)


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> None:
    """Rotate ``q`` [B, T, Hq, D] and ``k`` [B, T, Hk, D] in place (HF rotate-half RoPE).

    ``cos``/``sin``: fp32 [P, D//2] tables from :func:`rope_tables`; ``positions``: [B, T]
    int32/int64 absolute positions (assumed < P).  q/k may be strided views, last dim contiguous.
    """
    _validate(q, k, cos, sin, positions)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    if b * t == 0 or (hq == 0 and hk == 0):
        return
    _launch(q, k, cos, sin, positions, _plan(q, k, cos, sin, positions))


def _rotate_ref(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference; returns new rotated ``(q, k)`` as float32 tensors (inputs untouched)."""
    pos = positions.long()
    c = cos.float()[pos][:, :, None, :]  # [B, T, 1, D/2]
    s = sin.float()[pos][:, :, None, :]
    return _rotate_ref(q.float(), c, s), _rotate_ref(k.float(), c, s)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling, same ops as transformers' ``_compute_llama3_parameters``."""
    try:
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
    except KeyError as e:
        raise ValueError(f"rope_tables: llama3 scaling is missing key {e}") from None
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_tables(
    head_dim: int, max_positions: int, theta: float, scaling: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build fp32 ``(cos, sin)`` tables of shape [max_positions, head_dim // 2] on the CPU.

    ``scaling`` is the HF ``rope_scaling`` dict (or None).  Supported ``rope_type`` (or legacy
    ``type``) values: None/"default" and "llama3"; anything else raises ValueError.
    """
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"rope_tables: head_dim must be a positive even number, got {head_dim}")
    if max_positions <= 0:
        raise ValueError(f"rope_tables: max_positions must be positive, got {max_positions}")
    rope_type = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "llama3"):
        raise ValueError(f"rope_tables: unsupported rope type {rope_type!r} (supported: default, llama3)")
    dim = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().contiguous(), freqs.sin().contiguous()


_rope_launch = fast(_rope_kernel)  # launched through kernels.fastlaunch
