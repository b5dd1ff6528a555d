# Shared pieces of the kernels that read ggml K-quant blocks natively (kernels/ggml_gemv.py,
# kernels/ggml_dequant.py): the launchers' block checks and the in-register decoding of one tile.
#
# Block layouts: kernels/ggml_blocks.py.  A tile is BLOCK_N weight rows times one super-block (256
# values); ``base`` [BLOCK_N] int64 is the byte offset of that super-block in each row, read through
# ``blk`` (uint8 pointer) and ``h`` (the same storage as fp16: every block and row size is even, so an
# fp16 field at byte o of a block is element (base + o) / 2; rows must start 2-byte aligned).
#   Q4_K: one [BLOCK_N, 4, 32] byte tile (run i, byte l) of the 128 nibble bytes; its low nibbles are
#         values 64 i + l (sub-block 2 i), its high ones values 64 i + 32 + l (sub-block 2 i + 1).
#   Q5_K: the same tile (nibbles at byte 48) plus a [BLOCK_N, 1, 32] tile of the 32 qh bytes (byte 16),
#         whose bits 2 i and 2 i + 1 are the fifth bits of run i's low and high codes.
#   Legacy (block-32) types: a step is NB = 8 consecutive blocks (written out as 8 in the jit code: a
#         global tl.constexpr breaks Triton 3.9's interpreter; 256 values, the last step of a row
#         masked when K / 32 is not a multiple of 8): [BLOCK_N, NB] byte offsets ``base`` and two
#         [BLOCK_N, NB, 16] code tiles, values 32 j + l (lo) and 32 j + 16 + l (hi) of block j.
#   Q6_K: four [BLOCK_N, 4, 16] tiles, one per run r of 32 values in each 128-value half, indexed
#         (t, l) with t = 2 * half + s: value 128 * half + 32 r + 16 s + l, int8 scale 8 * half + 2 r + s
#         (each scale covers 16 consecutive values, so the 16 values of a tile row share one scale).
# Scales and mins are decoded once per sub-block (no per-value gathers); codes become fp32 in registers.
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.checks import check_device
from kernels.ggml_blocks import BLOCKS, LEGACY, row_bytes

SUPER = 256  # values per K-quant super-block, and per step of NB legacy blocks
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_blocks(blocks: torch.Tensor, qtype: str, k: int) -> torch.Tensor:
    """Validate a kernel's blocks operand (uint8 [N, row_bytes], contiguous, 2-byte aligned, N >= 1);
    returns its fp16 view (the kernels read d / dmin through it)."""
    if qtype not in BLOCKS:
        raise ValueError(f"unknown ggml block type {qtype!r}; expected one of {sorted(BLOCKS)}")
    size = row_bytes(qtype, k)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != size or blocks.shape[0] < 1:
        raise ValueError(f"{qtype} blocks for K={k} must be uint8 [N >= 1, {size}] (K / {BLOCKS[qtype][0]} blocks "
                         f"of {BLOCKS[qtype][1]} bytes a row), got {blocks.dtype} {tuple(blocks.shape)}")
    if not blocks.is_contiguous():
        raise ValueError("blocks must be row-major contiguous; pass blocks.contiguous()")
    if blocks.data_ptr() % 2:
        raise ValueError("blocks must start at a 2-byte aligned address (fp16 fields are read in place); "
                         "copy them to a fresh tensor")
    check_device(blocks)
    return blocks.view(torch.float16)


def check_out(out: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, like: torch.Tensor) -> None:
    """An output tensor of ``shape`` and ``dtype`` on ``like``'s device, unit stride along its last dim."""
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} {list(shape)}, got {out.dtype} {list(out.shape)}")
    if out.stride(1) != 1 and shape[1] > 1:
        raise ValueError(f"out must have unit stride along its last dim, got strides {out.stride()}")
    check_device(like, out)


def layout_meta(qtype: str) -> dict[str, int | bool]:
    """The decode constexprs both kernels take for ``qtype`` (K-quants: Q5 / Q6 flags; legacy types:
    kernels.ggml_blocks.LEGACY's byte layout)."""
    lay = LEGACY.get(qtype)
    return {"Q5": qtype == "q5_k", "Q6": qtype == "q6_k", "BLOCK_BYTES": BLOCKS[qtype][1], "LEGACY": lay is not None,
            "QS": lay.qs if lay else 0, "QH": lay.qh if lay else 0, "BITS": lay.bits if lay else 0,
            "MINS": lay.mins if lay else False, "OFFSET": lay.offset if lay else 0}


@triton.jit
def to_out(w, dt: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 ``w`` rounded to the output dtype ``dt``.  RNE_BF16 (set under the CPU interpreter, whose
    fp32 -> bf16 cast truncates) rounds to nearest even with integer ops, as the GPU's cast does."""
    if RNE_BF16:
        b = w.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        y = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = w.to(dt)
    return y


@triton.jit
def q4k_cols():
    """[4, 32] value offsets (in the super-block) of a Q4_K tile's low nibbles; high ones are + 32."""
    i = tl.arange(0, 4)
    return 64 * i[:, None] + tl.arange(0, 32)[None, :]


@triton.jit
def _q4k_scale_min(blk, base, j):
    """6-bit (scale, min) of sub-blocks j ([4]) of each row's block, as [BLOCK_N, 4] fp32 (ggml
    get_scale_min_k4 on the 12 bytes at byte 4: j < 4 from bytes j, j + 4; j >= 4 from a nibble of
    byte j + 4 and the top bits of bytes j - 4 / j)."""
    hdr = blk + base[:, None] + 4
    a = tl.load(hdr + j[None, :]).to(tl.int32)
    b = tl.load(hdr + j[None, :] + 4).to(tl.int32)
    c = tl.load(hdr + (j ^ 4)[None, :]).to(tl.int32)
    first = (j < 4)[None, :]
    sc = tl.where(first, a & 63, (b & 0xF) | ((c >> 6) << 4))
    mn = tl.where(first, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def q4k_tile(blk, h, base, Q5: tl.constexpr):
    """One Q4_K (Q5: Q5_K) super-block of BLOCK_N rows: (lo, hi) codes [BLOCK_N, 4, 32] fp32 and, per
    run, the scales d * sc and mins dmin * m of its low and high sub-blocks ([BLOCK_N, 4] fp32 each)."""
    i = tl.arange(0, 4)
    offs = (48 if Q5 else 16) + q4k_cols() - 32 * i[:, None]  # byte 16 (48) + 32 i + l
    q = tl.load(blk + base[:, None, None] + offs[None, :, :], eviction_policy="evict_first")
    lo = q & 0xF
    hi = q >> 4
    if Q5:  # qh byte 16 + l, bit 2 i over lo and 2 i + 1 over hi.  Loaded again per run i in q's layout:
        # a [BLOCK_N, 1, 32] load broadcast over i spills 64 bytes (dot path, BLOCK_M 64) on sm_90
        qh_offs = 16 + q4k_cols() - 64 * i[:, None]
        qh = tl.load(blk + base[:, None, None] + qh_offs[None, :, :], eviction_policy="evict_first")
        bits = qh >> (2 * i).to(tl.uint8)[None, :, None]  # uint8 shifts (int32: ~30 more registers)
        lo = lo | ((bits << 4) & 16)
        hi = hi | ((bits << 3) & 16)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    d = tl.load(h + base // 2).to(tl.float32)[:, None]
    dmin = tl.load(h + base // 2 + 1).to(tl.float32)[:, None]
    sc_lo, m_lo = _q4k_scale_min(blk, base, 2 * i)
    sc_hi, m_hi = _q4k_scale_min(blk, base, 2 * i + 1)
    return lo, hi, d * sc_lo, d * sc_hi, dmin * m_lo, dmin * m_hi


@triton.jit
def q6k_cols(R: tl.constexpr):
    """[4, 16] value offsets (in the super-block) of run R's Q6_K tile."""
    t = tl.arange(0, 4)
    return (128 * (t // 2) + 16 * (t % 2) + 32 * R)[:, None] + tl.arange(0, 16)[None, :]


@triton.jit
def q6k_run(blk, h, base, R: tl.constexpr):
    """Run R of one Q6_K super-block of BLOCK_N rows: unsigned codes [BLOCK_N, 4, 16] fp32 (the int is
    code - 32) and their scales d * sc [BLOCK_N, 4] fp32.  ql byte 64 * half + 32 (R % 2) + u (nibble
    R // 2), qh byte 128 + 32 * half + u (bits 2R, 2R + 1), with u = 16 s + l."""
    t = tl.arange(0, 4)
    u = (16 * (t % 2))[:, None] + tl.arange(0, 16)[None, :]
    half = (t // 2)[:, None]
    row = blk + base[:, None, None]
    ql = tl.load(row + (64 * half + 32 * (R % 2) + u)[None, :, :], eviction_policy="evict_first")
    qh = tl.load(row + (128 + 32 * half + u)[None, :, :], eviction_policy="evict_first")
    q = (((ql >> (4 * (R // 2))) & 0xF) | (((qh >> (2 * R)) & 3) << 4)).to(tl.float32)
    sc = tl.load(blk + base[:, None] + (192 + 8 * (t // 2) + 2 * R + t % 2)[None, :])
    d = tl.load(h + base // 2 + 104).to(tl.float32)[:, None]
    return q, d * sc.to(tl.int8, bitcast=True).to(tl.float32)



@triton.jit
def legacy_cols():
    """[NB, 16] value offsets (from a step's first value) of the legacy tiles' low halves; high: + 16."""
    return 32 * tl.arange(0, 8)[:, None] + tl.arange(0, 16)[None, :]


@triton.jit
def legacy_bases(row_off, sb, BLOCK_BYTES: tl.constexpr):
    """[BLOCK_N, NB] byte offsets of step ``sb``'s legacy blocks (blocks NB * sb ..) in the rows that
    start at byte ``row_off`` ([BLOCK_N] int64)."""
    return row_off[:, None] + (sb * 8 + tl.arange(0, 8))[None, :] * BLOCK_BYTES


@triton.jit
def legacy_tile(blk, h, base, live, QS: tl.constexpr, QH: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr):
    """NB legacy blocks of BLOCK_N rows (byte offsets ``base`` [BLOCK_N, NB]; ``live`` [NB] False past
    the row's end, whose blocks read as d = 0 and code 0): (lo, hi) codes minus the offset [BLOCK_N, NB,
    16] fp32 (Q8_0: its int8 values) and d [BLOCK_N, NB] fp32.  Nibbles: byte QS + l holds value l
    (low) and 16 + l (high); qh: bit l of the 4 bytes at QH is value l's fifth bit."""
    l = tl.arange(0, 16)[None, None, :]
    row = blk + base[:, :, None]
    keep = live[None, :, None]
    if BITS == 8:
        lo = tl.load(row + QS + l, mask=keep, other=0, eviction_policy="evict_first").to(tl.int8, bitcast=True)
        hi = tl.load(row + QS + 16 + l, mask=keep, other=0, eviction_policy="evict_first").to(tl.int8, bitcast=True)
    else:
        q = tl.load(row + QS + l, mask=keep, other=0, eviction_policy="evict_first")
        lo = q & 0xF
        hi = q >> 4
        if BITS == 5:  # the qh byte of value l is l // 8 (lo) or 2 + l // 8 (hi), read once per value from L1
            bit = (l % 8).to(tl.uint8)
            qh_lo = tl.load(row + QH + l // 8, mask=keep, other=0, eviction_policy="evict_first")
            qh_hi = tl.load(row + QH + 2 + l // 8, mask=keep, other=0, eviction_policy="evict_first")
            lo = lo | (((qh_lo >> bit) & 1) << 4)
            hi = hi | (((qh_hi >> bit) & 1) << 4)
    lo = lo.to(tl.float32) - OFFSET
    hi = hi.to(tl.float32) - OFFSET
    d = tl.load(h + base // 2, mask=live[None, :], other=0.0).to(tl.float32)
    return lo, hi, d


@triton.jit
def legacy_min(h, base, live):
    """The fp16 min at byte 2 of each legacy block (Q4_1 / Q5_1) as [BLOCK_N, NB] fp32 (0 past the row)."""
    return tl.load(h + base // 2 + 1, mask=live[None, :], other=0.0).to(tl.float32)
