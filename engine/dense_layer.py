"""A layer's packed weights widened once for all the units of a prompt pass, not once per unit.

A prompt unit of at least ``kernels.qlinear.DENSE_MIN_M`` rows applies a packed (int4 / int8) projection by
widening the weight into the plan's dense tile and running the dense GEMM. A pass over several units does it
again for each: the 16-prompt burst's first pass on an H100 (6,647 tokens in 4 units) spent 24.7 ms of its
216.9 ms of compute in the widening (bench/results/2026-12-06-h100-s47/call4), about 4 times what one widening
a layer costs. Within one layer every unit reads the same weights, so where a pass has memory to spare (a slot
cache's free KV rows, or the planned prompt states' room it leaves: engine.head_ahead) the first unit widens
each projection into pieces of whole rows there, the others reuse them (a GEMM a piece, each into its columns of
the output), and the pieces are given up when the layer's units are done (the next layer carves the same ones).

``LAYERSTREAM_DENSE_LAYER=1`` turns it on. Off by default: measured slower on an H100 (session 49, the synthetic
7B AWQ at 6 GiB, the 16-prompt burst in one process, arms alternated; call2): first passes 249-255 ms against
227-274 ms without, second passes 435-444 against 404-465 ms. The free rows are 56 spans of 37.7 MB (a layer's K
or V for the 16 free slots), so gate_up runs as 8 GEMMs of 4,736 rows and down as 4 of 896, untuned, in place of
the tiled path's tuned 3 of 12,632 and 2 of 1,792.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from engine.quant.spec import QuantWeight
from kernels.tuning import untuned

Widen = Callable[[QuantWeight, int, int, torch.dtype, torch.Tensor], torch.Tensor]  # rows r0:r1 into out
Carve = Callable[[int, int], "list[torch.Tensor] | None"]  # (bytes, row bytes) -> flat uint8 pieces, or None
Tiles = list[tuple[int, torch.Tensor]]  # (first row, [rows, K] widened rows), covering a weight in order


def wanted() -> bool:
    """Whether a pass of several prompt units widens each layer once (``LAYERSTREAM_DENSE_LAYER=1``)."""
    return os.environ.get("LAYERSTREAM_DENSE_LAYER", "0").strip().lower() in ("1", "on", "true", "yes")


def layer_bytes(cfg, itemsize: int) -> int:
    """A decoder layer's projections widened: q, k, v, o, gate, up and down, ``itemsize`` bytes a value."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return (qkv * h + h * cfg.num_attention_heads * d + 3 * i * h) * itemsize


class DenseLayer:
    """Widened weights of the current layer, by where their packed codes live and their shape, in the pieces
    ``carve`` gives (whole rows each: one new buffer, or spans of free KV rows, engine.head_ahead)."""

    def __init__(self, carve: Carve, widen: Widen) -> None:
        self._carve, self._widen = carve, widen
        self.cache: dict[tuple, Tiles] = {}
        self.full = False  # a weight found no room: the rest of the layer takes the caller's tiled path
        self.widened = 0  # weights widened into the cache (tests, traces)

    def get(self, w: QuantWeight, dtype: torch.dtype) -> Tiles | None:
        """``w`` widened to ``dtype`` as row tiles: from the cache, or widened now when it fits; None when it does
        not (the caller's tiled path then runs), or for an act-order weight (x is permuted, not the weight)."""
        if w.perm is not None:
            return None
        # where its codes and scales live and its shape (a piece of a weight may start where the weight does)
        key = (w.qweight.data_ptr(), w.scales.data_ptr(), w.shape, w.qweight.stride(0), dtype)
        tiles = self.cache.get(key)
        if tiles is None and not self.full:
            n, k = w.shape
            pieces = self._carve(n * k * dtype.itemsize, k * dtype.itemsize)
            if pieces is None:
                self.full = True
                return None
            tiles, r0 = [], 0
            for piece in pieces:
                tile = piece.view(dtype).view(-1, k)
                tiles.append((r0, self._widen(w, r0, r0 + tile.shape[0], dtype, tile)))
                r0 += tile.shape[0]
            assert r0 == n
            self.cache[key] = tiles
            self.widened += 1
        return tiles


def widen_rows(qdequant, w: QuantWeight, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Rows ``r0:r1`` of ``w`` widened into ``out`` by ``qdequant`` (kernels.qdequant)."""
    rows = lambda t: None if t is None else t[r0:r1]  # noqa: E731
    return qdequant(w.qweight[r0:r1], w.scales[r0:r1], rows(w.zeros), w.spec.bits, dtype, mins=rows(w.mins), out=out)


def tiles_linear(gemm, x: torch.Tensor, tiles: Tiles, n: int, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` for a weight held as widened row tiles: a ``gemm`` (kernels.linear.linear) a tile, each into
    its columns of the output."""
    if len(tiles) == 1:
        return gemm(x, tiles[0][1], b)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    with untuned():  # a piece's width follows the free spans: its shape's pick if any, else the default, untimed
        for r0, tile in tiles:
            r1 = r0 + tile.shape[0]
            gemm(x2, tile, None if b is None else b[r0:r1], out=out[:, r0:r1])
    return out.view(*x.shape[:-1], n)
