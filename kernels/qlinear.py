# Quantized nn.Linear dispatcher: out = x @ dequant(w).T + bias over arbitrary leading dims.
#
# Shapes:  x [..., K] (last dim unit stride; leading dims flattened to M), the packed weight as in
#          kernels/quant_common.py (qweight int32 [N, K*BITS/32], scales / zeros [N, K/G], perm [K]
#          or None, mins like scales or None), bias [N] or None; out [..., N] in x's dtype.
# Dispatch: M <= 64 -> kernels.qgemv (decode, memory-bound: each packed byte read once);
#           64 < M < DENSE_MIN_M -> kernels.qgemm (dequantization fused into the tensor-core GEMM);
#           M >= DENSE_MIN_M -> rows of the weight dequantized into a dense tile of at most
#           ``tile_bytes`` (kernels.qdequant), each through the dense GEMM (kernels.linear).
# Why the dense path: a long prefill chunk is compute-bound, and the fused qgemm reached only
# 0.38-0.47x bf16 cuBLAS at 2048 tokens on the H200 (session 7, bench/results/2026-12-01-h200-s7-quant/);
# widening the weight once costs about 5x the packed bytes of memory traffic (read int4, write bf16),
# against 2*M*N*K FLOPs of GEMM: for a 2048-token chunk, ~0.1x the GEMM's time.  The caller's memory
# plan holds the tile (engine: DEQUANT_SCRATCH, as for GGUF blocks).
from __future__ import annotations

import torch

from kernels.linear import linear
from kernels.qdequant import qdequant
from kernels.qgemm import qgemm
from kernels.qgemv import qgemv
from kernels.quant_common import check_quant_inputs, permute_input

QGEMV_MAX_M = 64
DENSE_MIN_M = 256  # rows from which a chunk runs dequantize + dense GEMM (estimate: dequant < 1.5x GEMM time)
TILE_BYTES = 64 << 20  # the default dense tile


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
            mins: torch.Tensor | None = None, tile_bytes: int = TILE_BYTES,
            tile: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a packed linear weight with Triton kernels; returns [..., N] in x's dtype. ``tile``: a
    contiguous buffer of at least ``tile_bytes`` that holds the dense tiles (a caller's, kept between
    calls), else each call allocates its own."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m >= DENSE_MIN_M:
        out = dense_qlinear(x2, qweight, scales, zeros, bits, bias, perm, mins, tile_bytes, tile)
    else:
        fn = qgemv if m <= QGEMV_MAX_M else qgemm
        out = fn(x2, qweight, scales, zeros, bits, bias, perm, mins=mins)
    return out.view(*lead, qweight.shape[0])


def dense_qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                  mins: torch.Tensor | None = None, tile_bytes: int = TILE_BYTES,
                  tile: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(w).T + bias`` for x [M, K]: rows of the weight widened into a dense tile of at most
    ``tile_bytes`` (in ``tile``'s storage when given), each tile through the dense GEMM into its columns of
    the output. One tile: the GEMM writes the output itself. Several: as few tiles as fit, of equal rows
    (:func:`tile_rows`), through :func:`tiled_linear`."""
    n, k, _ = check_quant_inputs(x, qweight, scales, zeros, bits, bias, mins)
    step = tile_rows(n, k, x.element_size(), tile_bytes)
    x = permute_input(x, perm)
    if step >= n:
        dense = None if tile is None else tile_view(tile, n, k, x.dtype)
        return linear(x, qdequant(qweight, scales, zeros, bits, x.dtype, mins=mins, out=dense), bias)

    def fill(r0: int, dst: torch.Tensor) -> None:
        r1 = r0 + dst.shape[0]
        qdequant(qweight[r0:r1], scales[r0:r1], None if zeros is None else zeros[r0:r1], bits,
                 mins=None if mins is None else mins[r0:r1], out=dst)
    return tiled_linear(x, n, step, fill, bias, tile=tile)


def tile_view(buf: torch.Tensor, rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A dense ``[rows, k]`` tensor of ``dtype`` over the start of a contiguous buffer ``buf``."""
    size = rows * k * dtype.itemsize
    if not buf.is_contiguous() or buf.numel() * buf.element_size() < size:
        raise ValueError(f"tile must be a contiguous buffer of at least {size} bytes for [{rows}, {k}] {dtype}, "
                         f"got {buf.numel() * buf.element_size()} bytes")
    return buf.view(-1).view(torch.uint8)[:size].view(dtype).view(rows, k)


def tiled_linear(x: torch.Tensor, n: int, step: int, fill, bias: torch.Tensor | None = None,
                 gemm=None, tile: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for x [M, K] and a weight ``w`` [n, K] that exists only tile by tile:
    ``fill(r0, tile)`` writes rows ``r0 .. r0 + len(tile)`` of ``w`` into ``tile``; each tile of ``step``
    rows (in ``tile``'s storage when given) goes through ``gemm(x, tile, bias, out=...)`` (default
    :func:`kernels.linear.linear`), which writes its columns of the output in place (a copy a tile had cost
    the H200's 7B AWQ burst pass 700 launches and 18.7 ms of GPU time, session 27). The last tile ends at row
    ``n`` and overlaps the one before (its first rows computed twice, written with the same values), so every
    GEMM has one shape (one tuning)."""
    assert 0 < step < n, "one tile: the caller runs the GEMM itself"
    gemm = gemm or linear
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    tile = torch.empty((step, x.shape[1]), dtype=x.dtype, device=x.device) if tile is None else \
        tile_view(tile, step, x.shape[1], x.dtype)
    for r0 in range(0, n, step):
        r0 = min(r0, n - step)
        fill(r0, tile)
        gemm(x, tile, None if bias is None else bias[r0:r0 + step], out=out[:, r0:r0 + step])
    return out


def tile_rows(n: int, k: int, itemsize: int, tile_bytes: int) -> int:
    """Rows of an ``[n, k]`` weight's dense tiles of at most ``tile_bytes``: ``n`` when it fits whole, else
    as few tiles as fit, of equal rows rounded up to a multiple of 8 (16-byte rows of a bf16 GEMM
    output) where that still fits."""
    most = tile_bytes // (k * itemsize)
    if most < 1:
        raise ValueError(f"tile_bytes={tile_bytes} cannot hold one weight row of {k} x {itemsize} bytes")
    if most >= n:
        return n
    step = -(-n // -(-n // most))
    return -(-step // 8) * 8 if -(-step // 8) * 8 <= most else max(1, most // 8 * 8)
