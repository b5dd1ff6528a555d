"""Which tensors a model has, and how one decoder layer is packed into one flat buffer.

A decoder layer is the unit that is kept resident or streamed. Its tensors are packed
(in the compute dtype) into one contiguous byte buffer, so moving a layer is one copy.
q/k/v (and their biases) and gate/up are laid side by side, which makes the fused
``qkv_proj`` and ``gate_up_proj`` matrices plain views of the same bytes: one GEMM each.
Every layer has the same layout, so a staging slot's views are built once and reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig

ALIGN = 256  # bytes; every group starts on a 256-byte boundary


def layer_tensor_shapes(cfg: ModelConfig) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per-layer tensors (HF names relative to ``model.layers.{i}.``), grouped; a group is contiguous."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    groups: list[list[tuple[str, tuple[int, ...]]]] = [
        [("input_layernorm.weight", (h,))],
        [("self_attn.q_proj.weight", (cfg.q_size, h)), ("self_attn.k_proj.weight", (cfg.kv_size, h)),
         ("self_attn.v_proj.weight", (cfg.kv_size, h))],
    ]
    if cfg.attention_bias:
        groups.append([("self_attn.q_proj.bias", (cfg.q_size,)), ("self_attn.k_proj.bias", (cfg.kv_size,)),
                       ("self_attn.v_proj.bias", (cfg.kv_size,))])
    groups.append([("self_attn.o_proj.weight", (h, cfg.q_size))])
    if cfg.has_qk_norm:
        groups.append([("self_attn.q_norm.weight", (cfg.head_dim,))])
        groups.append([("self_attn.k_norm.weight", (cfg.head_dim,))])
    groups.append([("post_attention_layernorm.weight", (h,))])
    groups.append([("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h))])
    groups.append([("mlp.down_proj.weight", (h, i))])
    return groups


# fused view name -> the group's first tensor name
FUSED = {"self_attn.qkv_proj.weight": "self_attn.q_proj.weight",
         "self_attn.qkv_proj.bias": "self_attn.q_proj.bias",
         "mlp.gate_up_proj.weight": "mlp.gate_proj.weight"}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the checkpoint must contain, exactly."""
    out = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
           "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for layer in range(cfg.num_hidden_layers):
        for group in layer_tensor_shapes(cfg):
            for name, shape in group:
                out[f"model.layers.{layer}.{name}"] = shape
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Entry:
    offset: int  # bytes into the packed buffer
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerLayout:
    """Byte offsets of every tensor (and fused view) inside a packed layer buffer."""

    entries: dict[str, Entry]
    nbytes: int
    dtype: torch.dtype

    @classmethod
    def build(cls, cfg: ModelConfig, dtype: torch.dtype) -> LayerLayout:
        size = torch.empty((), dtype=dtype).element_size()
        entries: dict[str, Entry] = {}
        pos = 0
        for group in layer_tensor_shapes(cfg):
            pos = -(-pos // ALIGN) * ALIGN
            start, rows = pos, 0
            for name, shape in group:
                entries[name] = Entry(pos, shape)
                pos += _numel(shape) * size
                rows += shape[0]
            fused = [f for f, first in FUSED.items() if first == group[0][0]]
            if fused:
                entries[fused[0]] = Entry(start, (rows, *group[0][1][1:]))
        return cls(entries, -(-pos // ALIGN) * ALIGN, dtype)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of every tensor into ``buf`` (a flat uint8 tensor of >= nbytes)."""
        assert buf.dtype == torch.uint8 and buf.numel() >= self.nbytes
        typed = buf[: self.nbytes].view(self.dtype)
        size = typed.element_size()
        out = {}
        for name, e in self.entries.items():
            start = e.offset // size
            out[name] = typed[start:start + _numel(e.shape)].view(e.shape)
        return out

    def pack(self, tensors: dict[str, torch.Tensor], buf: torch.Tensor) -> None:
        """Copy (and cast) a layer's checkpoint tensors into ``buf`` in this layout."""
        views = self.views(buf)
        for name, src in tensors.items():
            views[name].copy_(src)

    @property
    def names(self) -> list[str]:
        """The checkpoint tensor names (without fused views)."""
        return [n for n in self.entries if n not in FUSED]
