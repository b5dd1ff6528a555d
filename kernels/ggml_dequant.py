# ggml blocks -> dense weight, for prefill (the caller then runs its dense GEMM on it).
#
# Shapes:  blocks  uint8 [N, K/256 * bytes] (K-quants) or [N, K/32 * bytes] (legacy types)  GGUF
#                  tensor rows (layouts: kernels/ggml_blocks.py), contiguous, 2-byte aligned
#          out     [N, K]  bf16 / fp16 / fp32, unit stride along K, any row stride
# Scheme:  program (n, s) decodes super-block s (legacy types: blocks 8 s .. 8 s + 7, those past the
#          row masked) of BLOCK_N rows in registers (kernels/ggml_common.py) and writes its 256
#          values a row.  Every product of the decode is exact in fp32 (fp16 d times a 6-bit or int8
#          scale times a code of at most 6 bits fits 24 bits; fp16 d times an int8 or 5-bit code),
#          so each value is the reference's fp32 value rounded once to the output dtype, FMA
#          contraction or not (Q4_1 / Q5_1 add m to the exact product: one rounding either way).
# Tuning:  BLOCK_N and num_warps are fixed guesses (a program moves BLOCK_N * (144, 176 or 210;
#          legacy 8 * 18..34) bytes in and BLOCK_N * 256 values out); to tune on the GPU: BLOCK_N 8..64, num_warps 2..8.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ggml_blocks import BLOCKS, dequant_ref
from kernels.ggml_common import (INTERPRET, SUPER, check_blocks, check_out, layout_meta, legacy_bases, legacy_cols,
                                 legacy_min, legacy_tile, q4k_cols, q4k_tile, q6k_cols, q6k_run, to_out)

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK_N = 32 if INTERPRET else 16  # the interpreter: fewer, wider programs (kernels.ggml_gemv)
_NUM_WARPS = 4


@triton.jit
def _legacy_store(blk, h, base, left, o, keep, QS: tl.constexpr, QH: tl.constexpr, BITS: tl.constexpr,
                  MINS: tl.constexpr, OFFSET: tl.constexpr, RNE_BF16: tl.constexpr):
    """Decode NB legacy blocks (``left`` or more of them in the row) and store them at ``o`` (the step's
    first value of each row, [BLOCK_N, 1, 1]) where ``keep``."""
    live = tl.arange(0, 8) < left
    lo, hi, d = legacy_tile(blk, h, base, live, QS, QH, BITS, OFFSET)
    w_lo = d[:, :, None] * lo
    w_hi = d[:, :, None] * hi
    if MINS:  # d * q is exact in fp32, so a contracted fma(d, q, m) rounds as ggml's d * q + m
        m = legacy_min(h, base, live)[:, :, None]
        w_lo += m
        w_hi += m
    keep = keep & live[None, :, None]
    cols = legacy_cols()[None, :, :]
    dt = o.dtype.element_ty
    tl.store(o + cols, to_out(w_lo, dt, RNE_BF16), mask=keep)
    tl.store(o + cols + 16, to_out(w_hi, dt, RNE_BF16), mask=keep)


@triton.jit
def _ggml_dequant_kernel(blk, h, out_ptr, N, n_blocks, row_bytes, stride_on,
                         Q5: tl.constexpr, Q6: tl.constexpr, BLOCK_BYTES: tl.constexpr, LEGACY: tl.constexpr,
                         QS: tl.constexpr, QH: tl.constexpr, BITS: tl.constexpr, MINS: tl.constexpr,
                         OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BF16: tl.constexpr):
    pid_n = tl.program_id(0)
    sb = tl.program_id(1)  # super-block, or step of NB = 8 legacy blocks: 256 values either way
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_off = tl.minimum(rows, N - 1).to(tl.int64) * row_bytes  # tail rows re-read row N-1
    o = (out_ptr + rows.to(tl.int64) * stride_on + sb * 256)[:, None, None]
    keep = (rows < N)[:, None, None]
    dt = out_ptr.dtype.element_ty
    base = row_off + sb * BLOCK_BYTES
    if LEGACY:
        _legacy_store(blk, h, legacy_bases(row_off, sb, BLOCK_BYTES), n_blocks - sb * 8, o, keep, QS, QH, BITS, MINS,
                      OFFSET, RNE_BF16)
    elif Q6:
        for r in tl.static_range(4):
            q, s = q6k_run(blk, h, base, r)
            tl.store(o + q6k_cols(r)[None, :, :], to_out(s[:, :, None] * (q - 32.0), dt, RNE_BF16), mask=keep)
    else:
        lo, hi, s_lo, s_hi, m_lo, m_hi = q4k_tile(blk, h, base, Q5)
        cols = q4k_cols()[None, :, :]
        tl.store(o + cols, to_out(s_lo[:, :, None] * lo - m_lo[:, :, None], dt, RNE_BF16), mask=keep)
        tl.store(o + cols + 32, to_out(s_hi[:, :, None] * hi - m_hi[:, :, None], dt, RNE_BF16), mask=keep)


def launch_meta(qtype: str, dtype: torch.dtype) -> tuple[dict[str, int | bool], int]:
    """The kernel's constexprs and num_warps for an output in ``dtype``."""
    meta = {**layout_meta(qtype), "BLOCK_N": _BLOCK_N, "RNE_BF16": INTERPRET and dtype == torch.bfloat16}
    return meta, _NUM_WARPS


def ggml_dequant(blocks: torch.Tensor, qtype: str, k: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight [N, k] in ``dtype`` (bf16 / fp16 / fp32) of ggml ``qtype`` blocks (q4_k / q5_k / q6_k,
    or q8_0 / q4_0 / q4_1 / q5_0 / q5_1 with k any multiple of 32).

    blocks: uint8 [N, row_bytes(qtype, k)], each row the bytes of one GGUF tensor row, contiguous
    and 2-byte aligned.  Values are :func:`kernels.ggml_blocks.dequant_ref`'s rounded once to
    ``dtype``.  ``out`` (optional): [N, k] in ``dtype``, unit stride along k, any row stride.
    """
    h = check_blocks(blocks, qtype, k)
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"unsupported output dtype {dtype}; expected bf16, fp16 or fp32")
    n = blocks.shape[0]
    if out is None:
        out = torch.empty((n, k), device=blocks.device, dtype=dtype)
    check_out(out, (n, k), dtype, blocks)
    meta, warps = launch_meta(qtype, dtype)
    grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, SUPER))
    _ggml_dequant_kernel[grid](blocks, h, out, n, k // BLOCKS[qtype][0], blocks.shape[1], out.stride(0), **meta,
                               num_warps=warps)
    return out


def ggml_dequant_ref(blocks: torch.Tensor, qtype: str, k: int, dtype: torch.dtype) -> torch.Tensor:
    """torch reference for :func:`ggml_dequant`: the fp32 decode rounded to ``dtype``."""
    return dequant_ref(blocks, qtype, k).to(dtype)
