"""The Triton backend of the per-layer operations (``--kernels triton``, the default on CUDA).

``TritonOps`` has ``engine.ops.TorchOps``'s methods and signatures and calls the kernels in ``kernels/``;
shapes as in engine/ops.py.
"""

from __future__ import annotations

import contextlib

import torch

from engine.dense_layer import tiles_linear, widen_rows
from engine.ops import TorchOps
from engine.quant.ggml import GGMLWeight, dequant_scratch
from engine.quant.spec import QuantWeight


class TritonOps(TorchOps):
    """The Triton kernels of ``kernels/``; same signatures as ``TorchOps``."""

    name = "triton"
    varlen = True  # rope_kv_append_rows / attention_varlen (engine/varlen.py)

    def __init__(self) -> None:
        from kernels import (add_rmsnorm, attention_decode, attention_prefill, embedding, kv_append, linear,
                             rmsnorm, rope, rope_kv_append, swiglu)
        from kernels import qgemv_i8, qlinear
        from kernels.qdequant import qdequant
        self._qdequant = qdequant
        self._qlinear, self._tile_rows, self._tiled = qlinear.qlinear, qlinear.tile_rows, qlinear.tiled_linear
        self._tile_view, self._dense_min_m = qlinear.tile_view, qlinear.DENSE_MIN_M
        from kernels.add_rmsnorm_i8 import add_rmsnorm_qgemv
        from kernels.attention_qgemv import attention_qgemv, enabled as round_in_attention
        self._swiglu_qgemv, self._norm_qgemv, self._i8_rows = qgemv_i8.swiglu_qgemv, add_rmsnorm_qgemv, qgemv_i8.MAX_M
        self._attention_qgemv = attention_qgemv if round_in_attention() else None
        self._k = dict(rmsnorm=rmsnorm.rmsnorm, add_rmsnorm=add_rmsnorm.add_rmsnorm, linear=linear.linear,
                       swiglu=swiglu.swiglu, rope=rope.apply_rope_, kv_append=kv_append.kv_append_,
                       rope_kv_append=rope_kv_append.rope_kv_append_,
                       prefill=attention_prefill.attention_prefill, decode=attention_decode.attention_decode,
                       prefill_varlen=attention_prefill.attention_prefill_varlen,
                       embedding=embedding.embedding)
        from kernels import ggml_dequant, ggml_gemv
        self._k.update(ggml_gemv=ggml_gemv.ggml_gemv, ggml_dequant=ggml_dequant.ggml_dequant)
        self._ggml_max_m = ggml_gemv.GGML_GEMV_MAX_M
        from kernels.tuning import untuned
        self._untuned, self._gemv_max_m = untuned, linear.GEMV_MAX_M
        self._scratch = dequant_scratch()  # the dense tile; the engine sets its plan's (use_scratch)

    def rmsnorm(self, x, w, eps):
        return self._k["rmsnorm"](x, w, eps)

    def add_rmsnorm(self, x, residual, w, eps):
        return self._k["add_rmsnorm"](x, residual, w, eps)

    def _tile_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The dense tile's buffer for a chunk of x's rows (None below the dense path's rows): allocated once
        and kept, as the plan holds it (a fresh tile a call, up to a whole 130 MiB projection, left the 7B AWQ's
        32-client burst at 6 GiB short of a contiguous block: session 27)."""
        if x.numel() // max(1, x.shape[-1]) < self._dense_min_m:
            return None
        if self._tile is None or self._tile.device != x.device:
            self._tile = torch.empty(self._scratch, dtype=torch.uint8, device=x.device)
        return self._tile

    def _widen(self, w: QuantWeight, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        return widen_rows(self._qdequant, w, r0, r1, dtype, out)

    def _tiles_linear(self, x: torch.Tensor, tiles, n: int, b: torch.Tensor | None) -> torch.Tensor:
        return tiles_linear(self._k["linear"], x, tiles, n, b)

    def linear(self, x, w, b=None):
        if isinstance(w, QuantWeight) and self._dense is not None and x.numel() // x.shape[-1] >= self._dense_min_m:
            tiles = self._dense.get(w, x.dtype)  # widened once for the layer's units (dense_layer)
            if tiles is not None:
                return self._tiles_linear(x, tiles, w.shape[0], b)
        if isinstance(w, QuantWeight):  # dequantized in the kernel's registers
            return self._qlinear(x, w.qweight, w.scales, w.zeros, w.spec.bits, b, w.perm, mins=w.mins,
                                 tile_bytes=self._scratch, tile=self._tile_buffer(x))  # long chunks: the plan's tile
        if isinstance(w, GGMLWeight):
            return self._ggml_linear(x, w, b)
        return self._k["linear"](x, w, b)

    def _ggml_linear(self, x: torch.Tensor, w: GGMLWeight, b: torch.Tensor | None) -> torch.Tensor:
        """GGUF blocks: a GEMV per part into its columns of the output (decode), or (prefill chunks:
        compute-bound) rows of the weight decoded into a dense tile of at most ``self._scratch``
        bytes at a time, each through the dense GEMM."""
        (n, k), lead = w.shape, x.shape[:-1]
        x2 = x.reshape(-1, k)
        if x2.shape[0] <= self._ggml_max_m:
            out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
            for row, qtype, blocks in w.rows():
                bias = None if b is None else b[row:row + blocks.shape[0]]
                self._k["ggml_gemv"](x2, blocks, qtype, out=out[:, row:row + blocks.shape[0]], bias=bias)
            return out.view(*lead, n)
        step = self._tile_rows(n, k, x.element_size(), self._scratch)
        buf = self._tile_buffer(x2)
        if step >= n:  # one tile: the GEMM writes the output itself
            dense = None if buf is None else self._tile_view(buf, n, k, x.dtype)
            return self._k["linear"](x, self._ggml_dense_rows(w, 0, n, x.dtype, out=dense), b)
        fill = lambda r0, tile: self._ggml_dense_rows(w, r0, r0 + tile.shape[0], x.dtype, out=tile)  # noqa: E731
        return self._tiled(x2, n, step, fill, b, gemm=self._k["linear"], tile=buf).view(*lead, n)

    def _ggml_dense_rows(self, w: GGMLWeight, r0: int, r1: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` of a GGUF weight decoded into a dense ``[r1 - r0, K]`` tensor (``out`` if given)."""
        dense = out if out is not None else torch.empty((r1 - r0, w.in_features), dtype=dtype, device=w.device)
        for row, qtype, blocks in w.rows():
            a, z = max(r0, row), min(r1, row + blocks.shape[0])
            if a < z:
                self._k["ggml_dequant"](blocks[a - row:z - row], qtype, w.in_features, dtype, out=dense[a - r0:z - r0])
        return dense

    def swiglu(self, gate_up):
        return self._k["swiglu"](gate_up)

    def _i8_rows_of(self, x: torch.Tensor, w) -> int | None:
        """x's rows when a fused int8-x path may take x @ w (decode rows, an int4 weight without act order)."""
        rows = x.numel() // x.shape[-1]
        ok = isinstance(w, QuantWeight) and w.perm is None and w.spec.bits == 4 and rows <= self._i8_rows
        return rows if ok else None

    def add_rmsnorm_linear(self, x, residual, norm_w, eps, w, b=None):
        if (rows := self._i8_rows_of(x, w)) is not None:  # the norm's program rounds its rows (a launch less)
            fused = self._norm_qgemv(x.reshape(rows, -1), residual.reshape(rows, -1), norm_w, eps, w.qweight,
                                     w.scales, w.zeros, 4, b, mins=w.mins)
            if fused is not None:
                return fused[0].view(*x.shape[:-1], -1), fused[1].view(x.shape)
        h, residual = self.add_rmsnorm(x, residual, norm_w, eps)
        return self.linear(h, w, b), residual

    def swiglu_linear(self, gate_up, w):
        if (rows := self._i8_rows_of(gate_up, w)) is not None:  # x's int8 rounding computes the SwiGLU
            out = self._swiglu_qgemv(gate_up.reshape(rows, -1), w.qweight, w.scales, w.zeros, 4, mins=w.mins)
            if out is not None:
                return out.view(*gate_up.shape[:-1], -1)
        return self.linear(self.swiglu(gate_up), w)

    def rope_(self, q, k, cos, sin, positions):
        self._k["rope"](q, k, cos, sin, positions)

    def kv_append_(self, k, v, k_cache, v_cache, start_pos):
        self._k["kv_append"](k, v, k_cache, v_cache, start_pos)

    def rope_kv_append_(self, q, k, v, cos, sin, positions, k_cache, v_cache, start_pos):
        if isinstance(k_cache, torch.Tensor):  # a contiguous cache: one launch, not two (paged: its own append)
            self._k["rope_kv_append"](q, k, v, cos, sin, positions, k_cache, v_cache, start_pos)
        else:
            super().rope_kv_append_(q, k, v, cos, sin, positions, k_cache, v_cache, start_pos)

    def rope_kv_append_rows(self, q, k, v, cos, sin, positions, k_cache, v_cache, cache_pos, cache_rows):
        self._k["rope_kv_append"](q, k, v, cos, sin, positions, k_cache, v_cache, cache_pos, cache_rows=cache_rows)

    def attention_varlen(self, q, k_cache, v_cache, start_pos, q_lens, seq_rows, cache_rows, max_rows, scale,
                         blocks=None, block_m=0):
        return self._k["prefill_varlen"](q, k_cache, v_cache, start_pos, q_lens, seq_rows, cache_rows, max_rows, scale,
                                         blocks, block_m)

    def attention(self, q, k_cache, v_cache, start_pos, q_lens, scale, max_len):
        if q.shape[1] == 1:  # decode: one query per sequence, flash-decoding over the cache
            out = self._k["decode"](q[:, 0], k_cache, v_cache, self.seq_lens(start_pos, q_lens), scale,
                                    max_seq_len=_decode_bound(k_cache, max_len))
            return out.unsqueeze(1)
        return self._k["prefill"](q, k_cache, v_cache, start_pos, q_lens, scale)

    def attention_o(self, q, k_cache, v_cache, start_pos, q_lens, scale, max_len, w_o):
        b, t = q.shape[:2]
        if (self._attention_qgemv is not None and t == 1 and isinstance(k_cache, torch.Tensor)
                and self._i8_rows_of(q.reshape(b, -1), w_o) is not None):  # the attention rounds o_proj's x
            out = self._attention_qgemv(q[:, 0], k_cache, v_cache, self.seq_lens(start_pos, q_lens), scale,
                                        _decode_bound(k_cache, max_len), w_o.qweight, w_o.scales, w_o.zeros, 4,
                                        mins=w_o.mins)
            if out is not None:
                return out.view(b, 1, -1)
        return super().attention_o(q, k_cache, v_cache, start_pos, q_lens, scale, max_len, w_o)

    def embedding(self, ids, table):
        return self._k["embedding"](ids, table)

    def prompt_chunk(self, rows: int) -> contextlib.AbstractContextManager:
        """A short prompt chunk (rows <= 64, the GEMV's range) runs shapes not tuned yet with their
        default configs: tuning them would compile dozens of configs for a one-off call (see
        kernels.tuning.untuned). Longer chunks tune (the compute-bound GEMM gains from it)."""
        return self._untuned() if rows <= self._gemv_max_m else contextlib.nullcontext()


def _decode_bound(k_cache: torch.Tensor, max_len: int) -> int:
    """The decode attention's bound on the lengths: a power of two (at least 256, at most the cache), so that
    few distinct split plans and kernel variants exist."""
    return min(k_cache.shape[2], 1 << max(8, (max_len - 1).bit_length()))
