"""What a host layer costs beyond its four projections, for the plan (issue 18).

The planner (``memory.host_lane``) times a host layer as its weight bytes at the host's measured
GEMV rate (``memory.host_rate``). A decode layer on the host does more: two RMSNorms, RoPE, the
KV append, attention over the context in fp32, the SwiGLU, the residual adds, and some hundred
torch calls from Python. On the H200's host the 7B AWQ's int4 layer took 3.32 ms where its
projections took 2.29 ms (context 1,024, 16 threads: bench/results/2026-12-05-h200-s38/call1/
int4_layer.txt); on a 2-vCPU CI machine 13.6 against 12.1 ms. Planned without it, the lane's
layers took 1.6x their planned time (session 37) and the plan picked host layers that lost.

:func:`layer_extra_s` measures that remainder directly: the lane's own layer code
(``engine.model.Model.layer`` on :class:`engine.host_lane.HostOps`) with projections that return
zeros of their output's shape, at the model's head counts and sizes, so nothing but the weights'
reads is left out. It runs on the caller's thread with its torch thread count (the engine runs it
on a worker set up as the lane's: ``engine.host_worker.run_pinned``).
"""

from __future__ import annotations

import time

import torch

from engine.config import ModelConfig
from engine.host_lane import HOST_KV_DTYPE, HostOps
from engine.model import Model

EXTRA_CONTEXT = 1024  # positions the measured attention reads (at most the plan's context)


class _ProjectionsOff(HostOps):
    """HostOps whose projections are zeros of their output's shape (plus the bias, as the lane adds it)."""

    def linear(self, x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b.to(y.dtype)


def stand_ins(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's tensors as the lane's code reads them: the norms' weights and the bias real, each
    projection an empty [N, 0] tensor (only its output size is read)."""
    qkv = cfg.q_size + 2 * cfg.kv_size
    w = {"self_attn.qkv_proj.weight": torch.empty(qkv, 0), "self_attn.o_proj.weight": torch.empty(cfg.hidden_size, 0),
         "mlp.gate_up_proj.weight": torch.empty(2 * cfg.intermediate_size, 0),
         "mlp.down_proj.weight": torch.empty(cfg.hidden_size, 0),
         "input_layernorm.weight": torch.ones(cfg.hidden_size, dtype=dtype),
         "post_attention_layernorm.weight": torch.ones(cfg.hidden_size, dtype=dtype)}
    if cfg.attention_bias:
        w["self_attn.qkv_proj.bias"] = torch.zeros(qkv, dtype=dtype)
    if cfg.has_qk_norm:
        w["self_attn.q_norm.weight"] = w["self_attn.k_norm.weight"] = torch.ones(cfg.head_dim, dtype=dtype)
    return w


def decode_layer(cfg: ModelConfig, ops, weights: dict, dtype: torch.dtype, batch: int, context: int):
    """A callable running one decode step of one layer on the CPU through ``ops`` with ``weights``, ``batch`` rows
    whose attention reads ``context`` positions of an fp32 KV cache (inputs and cache built once, here)."""
    model = Model(cfg, None, ops, torch.device("cpu"), dtype, context + 1)
    shape = (batch, cfg.num_key_value_heads, context + 1, cfg.head_dim)
    kv = (torch.zeros(shape, dtype=HOST_KV_DTYPE), torch.zeros(shape, dtype=HOST_KV_DTYPE))
    h, res = torch.randn(batch, 1, cfg.hidden_size).to(dtype), torch.randn(batch, 1, cfg.hidden_size).to(dtype)
    start, q_lens = torch.full((batch,), context - 1, dtype=torch.int32), torch.ones(batch, dtype=torch.int32)
    pos = model.positions(start, 1)
    return lambda: model.layer(weights, h, res, pos, kv, start, q_lens, context)


def layer_extra_s(cfg: ModelConfig, dtype: torch.dtype, batch: int, context: int, repeats: int = 5) -> float:
    """Seconds one decode step of one host layer spends outside its projections, at ``batch`` rows whose
    attention reads ``context`` positions: the median of ``repeats`` timed calls after two warm-ups."""
    if batch < 1 or context < 1 or repeats < 1:
        raise ValueError(f"batch, context and repeats must be positive, got {batch}, {context}, {repeats}")
    step = decode_layer(cfg, _ProjectionsOff(), stand_ins(cfg, dtype), dtype, batch, context)
    times = []
    with torch.inference_mode():  # as the lane runs its layers (engine.host_lane.HostLane._compute)
        for k in range(repeats + 2):
            t0 = time.perf_counter()
            step()
            if k >= 2:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
