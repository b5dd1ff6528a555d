"""The per-layer operations, in two interchangeable backends.

``TorchOps`` is the plain-torch reference path (``--kernels torch``): it follows Hugging
Face's order of operations and dtypes, so in fp32 it matches ``transformers`` closely.
``TritonOps`` (``--kernels triton``, the default on CUDA; engine/ops_triton.py) calls the kernels in ``kernels/``.
Both expose the same methods; the model is written once against them.

Shapes: hidden states are [B, T, H]; q is [B, T, Hq, D] and k/v [B, T, Hk, D] (views of
the fused qkv projection); the KV cache of a layer is [B, Hk, S, D]; ``start_pos`` and
``q_lens`` are int32 [B] on the device.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from engine.dense_layer import DenseLayer
from engine.quant.ggml import GGMLWeight
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


def make_ops(kind: str) -> TorchOps:
    """``"torch"`` or ``"triton"``."""
    if kind == "torch":
        return TorchOps()
    if kind == "triton":
        from engine.ops_triton import TritonOps  # it subclasses TorchOps

        return TritonOps()
    raise ValueError(f"unknown kernels backend {kind!r}: use 'triton' or 'torch'")
