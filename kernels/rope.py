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
# Grid:    (cdiv(B*T, BLOCK_T),).  A program rotates BLOCK_T consecutive tokens (flattened over
#          B and T; the last program masks the tail), all Hq heads of q and all Hk heads of k, as
#          [BLOCK_T, heads, D/2] tiles of 16-byte vectors: each token's cos/sin row is read once,
#          and the q/k loads are issued before the position -> table gather so their latencies
#          overlap.  BLOCK_T: ~32 KB of q/k tile per program while keeping >= 2 programs per SM.
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.checks import check_device

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
_TILE_BYTES = 32768  # q/k bytes (padded tiles) a program aims to hold


@triton.jit
def _load_halves(base, tok_off, tok_mask, H, head_stride,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers, mask and both halves of D of H heads for BLOCK_T tokens: [BLOCK_T, BLOCK_H, BLOCK_D]."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ptrs = base + tok_off[:, None, None] + (h.to(tl.int64) * head_stride)[None, :, None] + d[None, None, :]
    mask = tok_mask[:, None, None] & (h < H)[None, :, None] & (d < HALF)[None, None, :]
    return ptrs, mask, tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + HALF, mask=mask, other=0.0)


@triton.jit
def _store_rotated(ptrs, mask, x1, x2, c, s, HALF: tl.constexpr):
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    ty = ptrs.dtype.element_ty
    tl.store(ptrs, (x1 * c - x2 * s).to(ty), mask=mask)
    tl.store(ptrs + HALF, (x2 * c + x1 * s).to(ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr,
    N_TOK, T, HQ, HK, P,
    sqb, sqt, sqh, skb, skt, skh, spb, spt,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # int32 division, int64 offsets
    tok_mask = tok < N_TOK
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    qp, qm, q1, q2 = _load_halves(q_ptr, b * sqb + t * sqt, tok_mask, HQ, sqh, HALF, BLOCK_HQ, BLOCK_D)
    kp, km, k1, k2 = _load_halves(k_ptr, b * skb + t * skt, tok_mask, HK, skh, HALF, BLOCK_HK, BLOCK_D)
    pos = tl.load(pos_ptr + b * spb + t * spt, mask=tok_mask, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    # an out-of-range position reads c = 1, s = 0: the token stays unrotated
    tab_mask = (tok_mask & (pos >= 0) & (pos < P))[:, None] & (d < HALF)[None, :]
    tab = pos[:, None] * HALF + d[None, :]
    c = tl.load(cos_ptr + tab, mask=tab_mask, other=1.0)[:, None, :]
    s = tl.load(sin_ptr + tab, mask=tab_mask, other=0.0)[:, None, :]
    _store_rotated(qp, qm, q1, q2, c, s, HALF)
    _store_rotated(kp, km, k1, k2, c, s, HALF)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _launch_shape(n_tok: int, block_hq: int, block_hk: int, block_d: int, elem: int,
                  sms: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): ~_TILE_BYTES of q/k per program, >= 2 programs per SM where possible."""
    tile = (block_hq + block_hk) * 2 * block_d  # elements of one token's q/k tiles
    block_t = min(_prev_pow2(_TILE_BYTES // (tile * elem)), _prev_pow2(n_tok // (2 * sms)))
    return block_t, min(16, max(2, _prev_pow2(block_t * tile // 1024)))


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
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_hq, block_hk = triton.next_power_of_2(max(hq, 1)), triton.next_power_of_2(max(hk, 1))
    sms = _num_sms(q.device.index or 0) if q.is_cuda else 1
    block_t, warps = _launch_shape(b * t, block_hq, block_hk, block_d, q.element_size(), sms)
    _rope_kernel[(triton.cdiv(b * t, block_t),)](
        q, k, cos, sin, positions,
        b * t, t, hq, hk, cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        positions.stride(0), positions.stride(1),
        HALF=half, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=warps,
    )


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
