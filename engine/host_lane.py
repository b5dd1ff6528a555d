"""The host compute lane: a decode step computes the plan's host layers on the CPU.

The planner (``memory.host_lane``) marks some pinned streamed layers ``host``: a prefill (any pass
of more than one token per row) streams them like any other layer, while a decode step computes
them with torch on the CPU from the same pinned host copy the streamer fills its slots from.
The hidden state and residual cross to the host before such a layer and back after it; its
keys and values live in a KV cache in host memory. The device KV of a host layer is written by
the passes that stream it (the prefill) and copied to the host cache after each of them
(:meth:`HostLane.absorb`), so a decode step finds the prompt's keys there. Attention reads that
cache in place (:class:`HostOps`: grouped query heads, no per-head copy of the keys).

This implementation is synchronous: the compute stream is drained by the copy to the host, the
CPU computes, the result is copied back. The streamer's copies were issued before (a streamed
layer's release issues the next copy), so the copy engine keeps filling free slots while the CPU
works.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.config import ModelConfig
from engine.model import Model
from engine.ops import TorchOps

log = logging.getLogger(__name__)


class HostOps(TorchOps):
    """Torch ops for host layers: a decode step's attention reads the host KV cache in place, each
    group of query heads against its one KV head (no per-head copy of the keys and values)."""

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: torch.Tensor,
                  q_lens: torch.Tensor, scale: float, max_len: int) -> torch.Tensor:
        b, t, hq, d = q.shape
        if t != 1:
            return super().attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
        hk = k_cache.shape[1]
        k, v = k_cache[:, :, :max_len], v_cache[:, :, :max_len]  # [B, Hk, S, D]
        qg = q.reshape(b, hk, hq // hk, d)  # query head h reads KV head h // (Hq / Hk)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hk, G, S]
        hidden = torch.arange(max_len).view(1, 1, 1, max_len) > start_pos.long().view(b, 1, 1, 1)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1).to(v.dtype)
        out = torch.matmul(probs, v).reshape(b, 1, hq, d)
        return out * (q_lens.view(b, 1, 1, 1) > 0).to(out.dtype)


class HostLane:
    """Host layers' weights (views of pinned host copies), their host KV cache and their forward."""

    def __init__(self, cfg: ModelConfig, weights, cache, max_positions: int) -> None:
        """``weights``: ``engine.weights.ModelWeights`` whose plan has host layers; ``cache``: the
        device KV cache (``engine.kv_cache.KVCache``) whose decode steps this lane serves."""
        self.cfg, self.weights, self.cache = cfg, weights, cache
        self.layers = tuple(weights.plan.host_layers)
        assert self.layers, "a host lane needs host layers in the plan"
        self.dtype = weights.dtype
        self.cpu = Model(cfg, weights, HostOps(), torch.device("cpu"), self.dtype, max_positions)
        self.views = {i: weights.host_layer(i) for i in self.layers}
        shape = (cache.batch, cfg.num_key_value_heads, cache.max_context, cfg.head_dim)
        self.kv = {i: (torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
                   for i in self.layers}
        self.steps = 0  # decode steps that used the lane (counted at its first layer)
        self.seconds = 0.0  # wall time spent in host layers, crossings included (benchmarks: achieved GB/s)
        self.layer_bytes = weights.layout.nbytes  # what the CPU reads per host layer

    def serves(self, cache, t: int) -> bool:
        """A pass over ``cache`` with ``t`` tokens per row computes the host layers here (decode steps)."""
        return t == 1 and cache is self.cache

    def run(self, i: int, h: torch.Tensor, residual: torch.Tensor | None, start_pos: torch.Tensor,
            q_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` on the CPU: device hidden state [B, 1, H] (and residual) in, device out; attention
        reads the host cache up to the longest row (its positions are on the host here anyway)."""
        device, b = h.device, h.shape[0]
        self.steps += i == self.layers[0]
        stream = self.weights.stream
        if stream.tracer:  # the third lane of the timeline: on the compute stream, which waits for it
            stream.tracer.begin("host", f"layer.{i}", stream.sync.compute_stream())
        t0 = time.perf_counter()
        h_c = h.to("cpu", self.dtype)
        r_c = residual.to("cpu", self.dtype) if residual is not None else None
        start_c, q_c = start_pos.cpu(), q_lens.cpu()
        max_len = int((start_c + q_c).max())
        kv = tuple(c[:b] for c in self.kv[i])
        out, res = self.cpu.layer(self.views[i], h_c, r_c, self.cpu.positions(start_c, h.shape[1]), kv, start_c,
                                  q_c, max_len)
        out, res = out.to(device, h.dtype), res.to(device, h.dtype)
        self.seconds += time.perf_counter() - t0
        if stream.tracer:
            stream.tracer.end("host", f"layer.{i}", stream.sync.compute_stream())
        return out, res

    def absorb(self, i: int, kv: tuple[torch.Tensor, torch.Tensor], upto: int) -> None:
        """Copy positions ``[0, upto)`` of host layer ``i``'s device KV (rows [:B]) into the host cache,
        after a pass that streamed the layer (a prefill) wrote them."""
        if i not in self.kv:
            return
        b = kv[0].shape[0]
        for dst, src in zip(self.kv[i], kv):
            dst[:b, :, :upto].copy_(src[:, :, :upto])
