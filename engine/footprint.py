"""A model as the planner sees it: ``memory.footprint.Footprint`` built from a config and a checkpoint.

The planner knows no tensor names and no config fields; this module is where the engine's model
knowledge (which tensors a layer has, how it is packed, what the KV cache and a prefill token's
activations cost) becomes plain numbers.
"""

from __future__ import annotations

import math

import torch

from engine.config import ModelConfig
from engine.layout import LayerLayout, expected_tensors
from engine.quant.ggml import NativeLayouts, dequant_scratch_range, row_bytes
from engine.quant.layout import FUSED_LINEARS, LayerQuant, QuantLayerLayout, linear_shapes
from memory.footprint import Footprint, Module
from memory.plan import Plan
from memory.planner import make_plan, minimum_budget

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tensor_bytes_from_config(cfg: ModelConfig, file_dtype: torch.dtype) -> dict[str, int]:
    """Name -> bytes of every checkpoint tensor, as a file in ``file_dtype`` would hold them."""
    return {name: math.prod(shape) * file_dtype.itemsize for name, shape in expected_tensors(cfg).items()}


def _layer_file_bytes(cfg: ModelConfig, tb: dict[str, int], layout: LayerLayout | None) -> list[int]:
    """Bytes each decoder layer's tensors take in the files (any format: every ``model.layers.{i}.`` tensor
    of a quantized checkpoint; a full-precision one's layout names)."""
    if layout is not None:
        return [sum(tb[f"model.layers.{i}.{n}"] for n in layout.names) for i in range(cfg.num_hidden_layers)]
    out = [0] * cfg.num_hidden_layers
    for name, nbytes in tb.items():
        if name.startswith("model.layers."):
            out[int(name.split(".")[2])] += nbytes
    return out


def state_bytes_per_token(cfg: ModelConfig, elem_size: int) -> int:
    """What a prompt token keeps between layers in a layer-major prefill: its hidden state and residual."""
    return 2 * cfg.hidden_size * elem_size


def footprint(cfg: ModelConfig, dtype: torch.dtype, tensor_bytes: dict[str, int] | None = None,
              quant: LayerQuant | None = None) -> Footprint:
    """The model's modules and per-token costs in compute ``dtype``.

    ``tensor_bytes`` maps checkpoint tensor names to their bytes in the files (``{n: i.nbytes for
    n, i in ckpt.tensors.items()}``); absent, a checkpoint in ``dtype`` is assumed. With ``quant`` the
    layers are counted as their packed quantized bytes (what is kept in VRAM and streamed).
    """
    tb = tensor_bytes if tensor_bytes is not None else tensor_bytes_from_config(cfg, dtype)
    # a quantized checkpoint's layers have the format's tensor names: their file bytes are summed by prefix
    by_prefix = quant is not None and quant.source is not None and tensor_bytes is not None
    expected = {EMBED, "model.norm.weight"} if by_prefix else set(expected_tensors(cfg))
    missing = sorted(expected - set(tb))
    if missing:
        raise ValueError(f"tensor sizes lack {len(missing)} tensors the config implies (e.g. {missing[:3]}): "
                         "pass {name: info.nbytes for name, info in ckpt.tensors.items()} of a matching checkpoint")
    size = dtype.itemsize
    dense = LayerLayout.build(cfg, dtype)
    layer_bytes = [dense.nbytes] * cfg.num_hidden_layers
    if quant is not None and quant.native:  # GGUF blocks: layers differ in which modules are Q6_K
        layer_bytes = NativeLayouts.build(cfg, dtype, quant.native).layer_bytes
    elif quant is not None:
        layer_bytes = [QuantLayerLayout.build(cfg, dtype, quant).nbytes] * cfg.num_hidden_layers
    table = cfg.vocab_size * cfg.hidden_size * size
    head_file = tb[EMBED if cfg.tie_word_embeddings else LM_HEAD]
    head = table if quant is None or quant.native_head is None else \
        cfg.vocab_size * row_bytes(quant.native_head, cfg.hidden_size)
    modules = [Module("embed_tokens", "embedding", table, tb[EMBED])]
    files = _layer_file_bytes(cfg, tb, None if by_prefix else dense)
    modules += [Module(f"layers.{i}", "layer", layer_bytes[i], files[i]) for i in range(cfg.num_hidden_layers)]
    modules += [Module("norm", "norm", cfg.hidden_size * size, tb["model.norm.weight"]),
                Module("lm_head", "lm_head", head, head_file)]
    act = act_elements_per_token(cfg)
    tile = dequant_scratch_range(widest_projection(cfg) * size) if quant is not None else (0, 0)
    return Footprint(
        modules=tuple(modules), rows=cfg.vocab_size, tied=cfg.tie_word_embeddings,
        kv_bytes_per_token=2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size,
        act_bytes_per_token=act * size, state_bytes_per_token=state_bytes_per_token(cfg, size),
        logits_bytes_per_seq=cfg.vocab_size * 4 * 2,  # fp32 logits + scratch
        rope_bytes_per_position=2 * (cfg.head_dim // 2) * 4,  # fp32 cos and sin
        max_positions=cfg.max_position_embeddings,
        dtype=str(dtype).removeprefix("torch.") + (f", {quant.label}" if quant else ""),
        scratch_bytes=tile[0], scratch_max_bytes=tile[1],  # a prefill's dense tile of packed layers
        dtype_bytes=size)


def act_elements_per_token(cfg: ModelConfig) -> int:
    """Activation elements the plan holds per prefill token: ~6 hidden-sized tensors, fused qkv, the attention
    output, gate_up and the SwiGLU output."""
    return 6 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + cfg.q_size + 3 * cfg.intermediate_size


def fused_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of a layer's fused projections (qkv, o, gate_up, down), as the ops apply them."""
    each = linear_shapes(cfg)
    return [(sum(each[p][0] for p in parts), each[parts[0]][1]) for parts in FUSED_LINEARS.values()]


def widest_projection(cfg: ModelConfig) -> int:
    """Elements of a layer's largest fused projection: the dense tile that holds any of them whole."""
    return max(n * k for n, k in fused_shapes(cfg))


def plan_model(cfg: ModelConfig, tensor_bytes: dict[str, int] | None, dtype: torch.dtype,
               quant: LayerQuant | None = None, **workload) -> Plan:
    """``memory.planner.make_plan`` for this model (keywords: budgets, batch, context, bandwidths);
    ``quant``: the layers' linear weights are held packed (``engine.quant.checkpoint.layer_quant``)."""
    return make_plan(footprint(cfg, dtype, tensor_bytes, quant), **workload)


def min_budget(cfg: ModelConfig, dtype: torch.dtype, *, batch: int = 1, max_context: int = 4096,
               prefill_chunk: int = 2048, quant: LayerQuant | None = None, host_states: bool = False) -> int:
    """``memory.planner.minimum_budget`` for this model in compute ``dtype`` (``host_states``: with the
    prefill's prompt states in host memory)."""
    return minimum_budget(footprint(cfg, dtype, None, quant), batch=batch, max_context=max_context,
                          prefill_chunk=prefill_chunk, host_states=host_states)
