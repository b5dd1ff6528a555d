"""GGUF tensor names -> Hugging Face names, and the Q/K row order llama.cpp's converter changes.

llama.cpp names tensors ``blk.{i}.attn_q.weight``, ``token_embd.weight`` ...; the engine (and the
layout it packs layers into) uses the Hugging Face names. A tensor the engine has no use for
(e.g. ``rope_freqs.weight``) maps to None and is left out.

Row permutation: Hugging Face Llama checkpoints rotate each head's first half against its second
half (``rotate_half``); llama.cpp's kernels rotate adjacent pairs. Its converter therefore
reorders the rows of ``attn_q`` / ``attn_k`` (llama architecture only; Qwen keeps the HF order) so
that, per head, the GGUF rows are ``[r0, r(h), r1, r(h+1), ...]`` with ``h`` = head_dim / 2: GGUF
row ``2j`` is HF row ``j`` and GGUF row ``2j + 1`` is HF row ``h + j``. :func:`unpermute_rows`
undoes that.
"""

from __future__ import annotations

import re

import torch

from engine.config import ModelConfig

GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
IGNORED = {"rope_freqs.weight"}  # llama3 rope divisors: read into the config (engine.gguf.config)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors the engine does not use.

    Raises ValueError for a tensor it does not know (a file of a different model shape).
    """
    if gguf_name in GLOBAL:
        return GLOBAL[gguf_name]
    if gguf_name in IGNORED:
        return None
    m = _BLOCK_RE.match(gguf_name)
    if m and m[2] in LAYER:
        return f"model.layers.{m[1]}.{LAYER[m[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not one this engine knows; the file holds a model "
                     "shape it does not run")


def permuted_heads(cfg: ModelConfig, hf: str) -> int | None:
    """How many heads' rows llama.cpp interleaved in tensor ``hf`` (None: stored in HF order)."""
    if cfg.model_type != "llama":
        return None
    if hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias"):
        return cfg.num_attention_heads
    if hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias"):
        return cfg.num_key_value_heads
    return None


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of ``w`` (dim 0) from llama.cpp's per-head pair order back to the HF half-split order."""
    rows = w.shape[0]
    assert rows % (2 * heads) == 0, (rows, heads)
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`unpermute_rows`: HF order -> llama.cpp's order (for writing GGUF files)."""
    rows = w.shape[0]
    assert rows % (2 * heads) == 0, (rows, heads)
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
