"""The per-layer operations, in two interchangeable backends.

``TorchOps`` is the plain-torch reference path (``--kernels torch``): it follows Hugging
Face's order of operations and dtypes, so in fp32 it matches ``transformers`` closely.
``TritonOps`` (``--kernels triton``, the default on CUDA) calls the kernels in ``kernels/``.
Both expose the same methods; the model is written once against them.

Shapes: hidden states are [B, T, H]; q is [B, T, Hq, D] and k/v [B, T, Hk, D] (views of
the fused qkv projection); the KV cache of a layer is [B, Hk, S, D]; ``start_pos`` and
``q_lens`` are int32 [B] on the device.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from engine.dense_layer import DenseLayer, tiles_linear, widen_rows
from engine.quant.ggml import GGMLWeight, dequant_scratch
from engine.quant.rows import packed_linear
from engine.quant.spec import QuantWeight


class TorchOps:
    """Plain torch ops in the compute dtype (norms and softmax in fp32, like HF)."""

    name = "torch"
    varlen = False  # no one-launch path for stacked prompt slices (engine/varlen.py): group by group
    _lens: dict | None = None  # inside pass_scope: (start_pos, q_lens) ids -> (start_pos, q_lens, their sum)
    _scratch = 0  # bytes of a prefill's dense tile of packed layers (TritonOps; torch widens a whole weight)

    _tile: torch.Tensor | None = None  # the dense tile's buffer (TritonOps: allocated at the first long chunk, kept)
    mlp_budget: tuple[int, int] | None = None  # (rows, bytes): longer stacks' MLPs run in pieces (engine/mlp_chunks.py)
    mlp_pieces: int | None = None  # how many pieces they run in, where the caller says (engine/prompt_graphs.py)
    _dense: DenseLayer | None = None  # inside dense_layer: the layer's packed weights widened once (TritonOps)
    dense_widened = 0  # weights widened into a dense_layer cache so far

    def use_scratch(self, nbytes: int) -> None:
        """Decode packed layers for a prefill's GEMM into dense tiles of at most ``nbytes`` (the plan's)."""
        assert nbytes >= 1 << 16, nbytes
        self._scratch, self._tile = nbytes, None

    @contextlib.contextmanager
    def pass_scope(self):
        """One pass over the layers (or a captured piece of one): its inputs ``start_pos`` / ``q_lens`` are not
        written meanwhile, so ``seq_lens`` computes their sum once for all its layers."""
        outer = self._lens
        self._lens = {} if outer is None else outer
        try:
            yield
        finally:
            self._lens = outer

    @contextlib.contextmanager
    def dense_layer(self, carve):
        """One layer's units of a prompt pass: a packed weight a long unit applies is widened once into the pieces
        ``carve(bytes, row bytes)`` gives and reused by the other units (engine.dense_layer; None: as before).
        Torch widens whole weights anyway: only TritonOps keeps them."""
        if carve is None or self.name != "triton":
            yield
            return
        outer, self._dense = self._dense, DenseLayer(carve, self._widen)
        try:
            yield
        finally:
            self.dense_widened += self._dense.widened
            self._dense = outer

    def seq_lens(self, start_pos: torch.Tensor, q_lens: torch.Tensor) -> torch.Tensor:
        """``start_pos + q_lens`` (each row's length after this pass), once per pass inside ``pass_scope``."""
        if self._lens is None:
            return start_pos + q_lens
        key = (id(start_pos), id(q_lens))  # the entry holds both tensors: their ids stay theirs
        if key not in self._lens:
            self._lens[key] = (start_pos, q_lens, start_pos + q_lens)
        return self._lens[key][2]

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self.rmsnorm(residual, w, eps), residual

    def add_rmsnorm_linear(self, x: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, eps: float,
                           w: torch.Tensor | QuantWeight, b: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(add_rmsnorm(x, residual)[0], w, b), the new residual)``: a norm and the projection it
        feeds as one op (a backend may fuse them)."""
        h, residual = self.add_rmsnorm(x, residual, norm_w, eps)
        return self.linear(h, w, b), residual

    def linear(self, x: torch.Tensor, w: torch.Tensor | QuantWeight, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, QuantWeight | GGMLWeight):  # decoded per call, never kept: the packed bytes stay the copy
            return packed_linear(x, w, b)
        return F.linear(x, w, b)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def swiglu_linear(self, gate_up: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
        """``linear(swiglu(gate_up), w)``: the MLP's down projection (one op, so a backend may fuse it)."""
        return self.linear(self.swiglu(gate_up), w)

    def rope_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor) -> None:
        c = cos[positions].unsqueeze(2)  # [B, T, 1, D/2] fp32
        s = sin[positions].unsqueeze(2)
        for t in (q, k):
            c_, s_ = c.to(t.dtype), s.to(t.dtype)
            x1, x2 = t.chunk(2, dim=-1)
            r1 = x1 * c_ - x2 * s_
            r2 = x2 * c_ + x1 * s_
            t.copy_(torch.cat((r1, r2), dim=-1))

    def rope_kv_append_(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        start_pos: torch.Tensor) -> None:
        """``rope_`` then ``kv_append_`` as one op (a backend may fuse them): afterwards q and the caches are
        defined, ``k`` itself may or may not be rotated."""
        self.rope_(q, k, cos, sin, positions)
        self.kv_append_(k, v, k_cache, v_cache, start_pos)

    def kv_append_(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   start_pos: torch.Tensor) -> None:
        b, t = k.shape[:2]
        pos = start_pos.long().unsqueeze(1) + torch.arange(t, device=k.device)  # [B, T]
        pos = pos.clamp(max=k_cache.shape[2] - 1)  # the model never writes past S (checked on the host)
        idx = pos.view(b, 1, t, 1).expand(b, k_cache.shape[1], t, k_cache.shape[3])
        k_cache.scatter_(2, idx, k.transpose(1, 2).to(k_cache.dtype))
        v_cache.scatter_(2, idx, v.transpose(1, 2).to(v_cache.dtype))

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  start_pos: torch.Tensor, q_lens: torch.Tensor, scale: float, max_len: int) -> torch.Tensor:
        """Causal GQA attention of q [B, T, Hq, D] over cache[:, :, :max_len]; padded rows are zero."""
        b, t, hq, d = q.shape
        hk = k_cache.shape[1]
        k = k_cache[:, :, :max_len]
        v = v_cache[:, :, :max_len]
        if hq != hk:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        qpos = start_pos.long().view(b, 1) + torch.arange(t, device=q.device)  # [B, T]
        kpos = torch.arange(max_len, device=q.device)
        mask = kpos.view(1, 1, max_len) <= qpos.unsqueeze(-1)  # [B, T, S]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask.unsqueeze(1), scale=scale)
        out = out.transpose(1, 2)  # [B, T, Hq, D]
        valid = torch.arange(t, device=q.device).view(1, t) < q_lens.view(b, 1)
        return out * valid.view(b, t, 1, 1).to(out.dtype)

    def attention_o(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: torch.Tensor,
                    q_lens: torch.Tensor, scale: float, max_len: int, w_o) -> torch.Tensor:
        """The attention's output through o_proj (no bias): [B, T, hidden] (a backend may fuse the two)."""
        b, t = q.shape[:2]
        attn = self.attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
        return self.linear(attn.reshape(b, t, -1), w_o)

    def embedding(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, table)

    def prompt_chunk(self, rows: int) -> contextlib.AbstractContextManager:
        """Context for one prefill pass over ``rows`` token rows (nothing to do in torch)."""
        return contextlib.nullcontext()


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


def make_ops(kind: str) -> TorchOps:
    """``"torch"`` or ``"triton"``."""
    if kind == "torch":
        return TorchOps()
    if kind == "triton":
        return TritonOps()
    raise ValueError(f"unknown kernels backend {kind!r}: use 'triton' or 'torch'")
