"""One decoder layer of the supported families (Qwen2/2.5, Qwen3, Llama, Mistral), for one group of sequences
(``layer``) or several stacked through the projections (``layer_stacked``), against ``Model``'s ops backend,
config and RoPE tables."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from engine import mlp_chunks
from engine.mlp_chunks import plan_pieces

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.varlen import VarlenPlan
    from engine.groups import Group
    from engine.ops import TorchOps


class DecoderLayers:
    """The layer maths of ``engine.model.Model`` (a mixin: the model sets these)."""

    cfg: ModelConfig
    ops: TorchOps
    cos: torch.Tensor
    sin: torch.Tensor
    scale: float

    def layer(self, w: dict[str, torch.Tensor], h: torch.Tensor, residual: torch.Tensor | None,
              positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], start_pos: torch.Tensor,
              q_lens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer with weights w; returns (output, residual) (residual None: first layer)."""
        b, t = h.shape[:2]
        qkv, residual = self._qkv(w, h, residual)
        o = self._attend(w, qkv, b, t, positions, kv, start_pos, q_lens, max_len, w["self_attn.o_proj.weight"])
        held = [o, residual]
        del qkv, o, residual  # _mlp drops each input once used (see there)
        return self._mlp(w, held, projected=True)

    def layer_stacked(self, w: dict[str, torch.Tensor], h: torch.Tensor, residual: torch.Tensor | None,
                      groups: list[Group], positions: list[torch.Tensor],
                      kvs: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]],
                      attend_context: Callable[[int], contextlib.AbstractContextManager] | None = None,
                      varlen: tuple[VarlenPlan, Callable[[], tuple[torch.Tensor, torch.Tensor]]] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer`` for several groups at once, their token rows stacked: h / residual [1, R, H] hold each
        group's [B, T] rows flattened, in order (R = the sum of B x T). Each projection runs once over all R
        rows (one GEMM, and for a packed weight one dequantization, instead of one a group); the attention runs
        group by group in order (a later group may read an earlier one's keys), each fetching its keys and values
        (``kvs``) right before, under ``attend_context(its rows)`` where given (a short group's rope and
        attention shapes run untuned as they would alone, not tuned at serve time because the stack is long).
        ``varlen``: (the plan of the unit's trailing prompt slices, the layer's whole cache) runs those slices'
        RoPE + append and attention in one launch each (engine/varlen.py). Returns (output, residual) [1, R, H]."""
        rows = h.shape[0] * h.shape[1]
        qkv, residual = self._qkv(w, h.reshape(rows, -1), None if residual is None else residual.reshape(rows, -1))
        attn, r0 = [], 0
        for k, (g, pos, kv) in enumerate(zip(groups, positions, kvs)):
            if varlen is not None and k == varlen[0].first:
                plan = varlen[0]
                assert r0 == plan.row0, (r0, plan.row0)  # the plan's rows are the stack's trailing ones
                attn.append(self._attend_varlen(w, qkv[r0:r0 + plan.rows], plan, varlen[1], attend_context))
                r0 += plan.rows
                break
            b, t = g.ids.shape
            with attend_context(b * t) if attend_context is not None else contextlib.nullcontext():
                attn.append(self._attend(w, qkv[r0:r0 + b * t].view(b, t, -1), b, t, pos, kv(), g.start_pos,
                                         g.q_lens, g.max_len).reshape(b * t, self.cfg.q_size))
            r0 += b * t
        assert r0 == rows, "the stacked rows are the groups' rows"
        held = [torch.cat(attn), residual]
        del qkv, attn, residual  # _mlp drops each input once used (see there)
        out, residual = self._mlp(w, held)
        return out.view(h.shape), residual.view(h.shape)

    def _qkv(self, w: dict[str, torch.Tensor], h: torch.Tensor,
             residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention input norm and the fused q/k/v projection: (qkv, residual)."""
        ops, eps = self.ops, self.cfg.rms_norm_eps
        w_qkv, b_qkv = w["self_attn.qkv_proj.weight"], w.get("self_attn.qkv_proj.bias")
        if residual is None:
            return ops.linear(ops.rmsnorm(h, w["input_layernorm.weight"], eps), w_qkv, b_qkv), h
        return ops.add_rmsnorm_linear(h, residual, w["input_layernorm.weight"], eps, w_qkv, b_qkv)

    def _attend(self, w: dict[str, torch.Tensor], qkv: torch.Tensor, b: int, t: int, positions: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], start_pos: torch.Tensor, q_lens: torch.Tensor,
                max_len: int, w_o=None) -> torch.Tensor:
        """RoPE, the keys and values into the cache, attention: [b, t, heads, head_dim]; with ``w_o`` through o_proj
        too: [b, t, hidden] (``ops.attention_o``: a backend may fuse the two)."""
        ops = self.ops
        q, k, v = self._heads(w, qkv, b, t)
        k_cache, v_cache = kv
        ops.rope_kv_append_(q, k, v, self.cos, self.sin, positions, k_cache, v_cache, start_pos)
        if w_o is not None:
            return ops.attention_o(q, k_cache, v_cache, start_pos, q_lens, self.scale, max_len, w_o)
        return ops.attention(q, k_cache, v_cache, start_pos, q_lens, self.scale, max_len)

    def _attend_varlen(self, w: dict[str, torch.Tensor], qkv: torch.Tensor, plan: VarlenPlan,
                       kv: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                       attend_context: Callable[[int], contextlib.AbstractContextManager] | None) -> torch.Tensor:
        """``_attend`` of the prompt slices ``plan`` lays out (their stacked qkv rows), one launch for RoPE +
        append and one for the attention, under the context of the longest slice's rows: [rows, q_size]."""
        ops, rows = self.ops, qkv.shape[0]
        q, k, v = self._heads(w, qkv, 1, rows)
        k_cache, v_cache = kv()
        with attend_context(plan.max_rows) if attend_context is not None else contextlib.nullcontext():
            ops.rope_kv_append_rows(q, k, v, self.cos, self.sin, plan.positions, k_cache, v_cache, plan.cache_pos,
                                    plan.cache_row)
            out = ops.attention_varlen(q[0], k_cache, v_cache, plan.start, plan.q_lens, plan.seq_rows,
                                       plan.seq_cache_row, plan.max_rows, self.scale, plan.blocks, plan.block_m)
        return out.reshape(rows, self.cfg.q_size)

    def _heads(self, w: dict[str, torch.Tensor], qkv: torch.Tensor, b: int,
               t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of a fused qkv output as [b, t, heads, head_dim] views (q and k normed where the model has a
        q/k norm)."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        q = qkv[..., : cfg.q_size].view(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = qkv[..., cfg.q_size: cfg.q_size + cfg.kv_size].view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = qkv[..., cfg.q_size + cfg.kv_size:].view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.has_qk_norm:
            q = self.ops.rmsnorm(q, w["self_attn.q_norm.weight"], eps)
            k = self.ops.rmsnorm(k, w["self_attn.k_norm.weight"], eps)
        return q, k, v

    def _mlp(self, w: dict[str, torch.Tensor], held: list[torch.Tensor],
             projected: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection (unless ``projected``: held[0] is its output), the residual add and norm, the MLP:
        (output, residual). ``held`` is [attention output, residual], taken out of the list (the caller keeps no
        other reference) so that each dies once used: at the SwiGLU, a prefill chunk's peak, only gate_up and the
        new residual are alive, not also qkv, the attention output, o and the old residual (~110 MiB of 3,072 rows
        of the 7B, which had run a served pass out of memory at 6 GiB: session 30)."""
        ops = self.ops
        attn, residual = held
        held.clear()
        o = attn if projected else ops.linear(attn, w["self_attn.o_proj.weight"])
        del attn
        w_gate_up, w_down, cfg = w["mlp.gate_up_proj.weight"], w["mlp.down_proj.weight"], self.cfg
        rows = o.numel() // cfg.hidden_size
        parts = plan_pieces(ops, rows, w_gate_up, w_down, cfg.hidden_size, cfg.intermediate_size, o.element_size())
        if parts is not None:  # a long stack: the intermediate in pieces (engine/mlp_chunks.py)
            x, residual = ops.add_rmsnorm(o, residual, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
            del o
            out = mlp_chunks.run(ops, x.reshape(rows, -1), w_gate_up, w_down, parts, cfg.intermediate_size)
            return out.view(x.shape), residual
        gate_up, residual = ops.add_rmsnorm_linear(o, residual, w["post_attention_layernorm.weight"],
                                                   cfg.rms_norm_eps, w_gate_up)
        del o
        return ops.swiglu_linear(gate_up, w_down), residual
