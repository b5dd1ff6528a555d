"""The host compute lane: a decode step computes the plan's host layers on the CPU.

The planner (``memory.host_lane``) marks some pinned streamed layers ``host``: a prefill (any pass
of more than one token per row) streams them like any other layer, while a decode step computes
them with torch on the CPU from the same pinned host copy the streamer fills its slots from.
The hidden state and residual cross to the host before such a layer (or run of consecutive host
layers) and back after it; its keys and values live in a KV cache in host memory. The device KV
of a host layer is written by the passes that stream it (the prefill) and copied to the host
cache after each of them (:meth:`HostLane.absorb`), so a decode step finds the prompt's keys
there. Attention reads that cache in place (:class:`HostOps`: grouped query heads, no per-head
copy of the keys); quantized weights run on torch's CPU int4 kernel (``engine.host_int4``) or are
widened once to the lane's dtype (``engine.host_forms`` picks by measured rate).

The host layers run on one worker thread (``engine.host_worker``: pinned to the physical cores
the streamer's threads leave free, with one torch thread per core). On CUDA the crossings are
asynchronous copies between pinned buffers and the device on a stream of their own (not the
streamer's copy stream: it is in order, and a hidden state queued there would wait behind the
slot copies already issued): the crossing stream waits for the compute stream, copies the hidden
state down and records an event; the worker waits for that event, computes, and writes its
result to pinned buffers; the main thread copies it up on the crossing stream, and the compute
stream waits for that copy. Neither GPU stream is ever synchronised with the host: the copy engine
keeps filling the slots the streamer freed while the CPU works.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.config import ModelConfig
from engine.host_forms import INT4, WIDENED, hold_layer, widened_layer_bytes
from engine.host_int4 import CpuInt4Weight, int4_linear
from engine.host_worker import CorePick, HostWorker, machine_pick
from engine.model import Model
from engine.ops import TorchOps

log = logging.getLogger(__name__)

HOST_KV_DTYPE = torch.float32  # the host layers' KV cache (HostOps: fp32 attention; memory.host_lane counts it)


class HostOps(TorchOps):
    """Torch ops for host layers. A decode step's attention reads the host KV cache in place, each
    group of query heads against its one KV head (no per-head copy of the keys and values), in fp32:
    the host cache is fp32 (:data:`HOST_KV_DTYPE`), since torch's CPU batched matmuls of a decode
    step's shapes were 6-12x slower with a bf16 cache on an AVX2 host (the 7B's attention 6.0 / 26.0
    against 1.1 / 2.2 ms at 1,024 / 4,096 positions, bench/results/2026-12-04-cpu-host-lane), while the
    cache is a few MB per layer beside its ~0.5 GB of weights. A step's keys and values go into the
    cache by index, not by a scatter."""

    def rope_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor) -> None:
        """TorchOps.rope_'s rotation, bit for bit, in fewer ops for a decode step: ``t * [c, c] + roll(t) * [-s, s]``
        (the halves swapped by one roll) with the tables gathered and cast once for q and k."""
        if q.shape[1] != 1 or q.dtype != k.dtype:
            return super().rope_(q, k, cos, sin, positions)
        c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)  # [B, 1, 1, D/2] fp32
        cc, ss = torch.cat((c, c), -1).to(q.dtype), torch.cat((-s, s), -1).to(q.dtype)
        for t in (q, k):
            t.copy_(t * cc + t.roll(c.shape[-1], -1) * ss)

    def kv_append_(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   start_pos: torch.Tensor) -> None:
        b, t = k.shape[:2]
        if t != 1:
            return super().kv_append_(k, v, k_cache, v_cache, start_pos)
        rows, pos = torch.arange(b), start_pos.long().clamp(max=k_cache.shape[2] - 1)
        k_cache[rows, :, pos] = k[:, 0].to(k_cache.dtype)
        v_cache[rows, :, pos] = v[:, 0].to(v_cache.dtype)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: torch.Tensor,
                  q_lens: torch.Tensor, scale: float, max_len: int) -> torch.Tensor:
        b, t, hq, d = q.shape
        if t != 1:
            return super().attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
        hk = k_cache.shape[1]
        k, v = k_cache[:, :, :max_len], v_cache[:, :, :max_len]  # [B, Hk, S, D]
        qg = q.reshape(b, hk, hq // hk, d).to(k.dtype)  # query head h reads KV head h // (Hq / Hk)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)  # [B, Hk, G, S]
        start = start_pos.long()
        if int(start.min()) < max_len - 1:  # a row shorter than the longest: its later positions hidden
            scores.masked_fill_(torch.arange(max_len).view(1, 1, 1, max_len) > start.view(b, 1, 1, 1), float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(v.dtype), v).reshape(b, 1, hq, d).to(q.dtype)
        if int(q_lens.min()) > 0:  # every row real (a decode step's usual case): no padding row to zero
            return out
        return out * (q_lens.view(b, 1, 1, 1) > 0).to(out.dtype)

    def linear(self, x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, CpuInt4Weight):
            return int4_linear(x, w, b)
        return super().linear(x, w, b)


class Crossing:
    """The hidden state's trips between the device and the host lane (CUDA): pinned host buffers for
    ``batch`` rows and a stream of their own (module docstring)."""

    def __init__(self, device: torch.device, batch: int, hidden: int, dtype: torch.dtype) -> None:
        self.device, self.stream = device, torch.cuda.Stream(device)

        def pinned(shape, dt=dtype):
            return torch.empty(shape, dtype=dt, pin_memory=True)
        self.h, self.res, self.out_h, self.out_res = (pinned((batch, 1, hidden)) for _ in range(4))
        self.start, self.q_lens = pinned((batch,), torch.int32), pinned((batch,), torch.int32)

    def down(self, h: torch.Tensor, residual: torch.Tensor | None, start_pos: torch.Tensor, q_lens: torch.Tensor):
        """Queue the copies of the step's state to the host after the compute stream's work so far;
        returns the host views (filled once the returned event completes) and the event."""
        b = h.shape[0]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        pairs = [(self.h[:b], h), (self.res[:b], residual), (self.start[:b], start_pos), (self.q_lens[:b], q_lens)]
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                if src is not None:
                    dst.copy_(src, non_blocking=True)
                    if src.is_cuda:  # not reused by the compute stream before this copy ran
                        src.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return self.h[:b], self.res[:b] if residual is not None else None, self.start[:b], self.q_lens[:b], done

    def up(self, out: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the worker's result (pinned views) to new device tensors; the compute stream waits for it."""
        compute = torch.cuda.current_stream(self.device)
        h_dev = torch.empty(out.shape, dtype=out.dtype, device=self.device)
        r_dev = torch.empty_like(h_dev)
        with torch.cuda.stream(self.stream):
            h_dev.copy_(out, non_blocking=True)
            r_dev.copy_(res, non_blocking=True)
        compute.wait_stream(self.stream)
        return h_dev, r_dev

    def result(self, out: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(On the worker.) The result in the pinned output buffers, which ``up`` copies from. The
        previous result's up-copy ran before this step's down-copy (one stream), which the worker
        waited for, so it is safe to overwrite."""
        b = out.shape[0]
        self.out_h[:b].copy_(out)
        self.out_res[:b].copy_(res)
        return self.out_h[:b], self.out_res[:b]


class HostLane:
    """Host layers' weights (views of pinned host copies), their host KV cache, the worker thread that
    computes them and, on CUDA, the crossings of the hidden state."""

    def __init__(self, cfg: ModelConfig, weights, cache, max_positions: int, pick: CorePick | None = None,
                 weight_form: str = INT4) -> None:
        """``weights``: ``engine.weights.ModelWeights`` whose plan has host layers; ``cache``: the
        device KV cache (``engine.kv_cache.KVCache``) whose decode steps this lane serves; ``pick``:
        the worker's cores (default: :func:`engine.host_worker.machine_pick`); ``weight_form``: how
        quantized layers are held (``engine.host_forms``: int4 kernel, widened, or packed)."""
        self.cfg, self.weights, self.cache = cfg, weights, cache
        self.layers = tuple(weights.plan.host_layers)
        assert self.layers, "a host lane needs host layers in the plan"
        self.dtype = weights.dtype
        self.cpu = Model(cfg, weights, HostOps(), torch.device("cpu"), self.dtype, max_positions)
        self.weight_form, self.views, self.extra = weight_form, {}, {}
        for i in self.layers:  # converted once (engine.host_forms): the int4 kernel's form, or widened
            self.views[i], self.extra[i] = hold_layer(weights.host_layer(i), self.dtype, weight_form)
        shape = (cache.batch, cfg.num_key_value_heads, cache.max_context, cfg.head_dim)
        self.kv = {i: (torch.zeros(shape, dtype=HOST_KV_DTYPE), torch.zeros(shape, dtype=HOST_KV_DTYPE))
                   for i in self.layers}
        self.steps = 0  # decode steps that used the lane (counted at its first layer)
        self.seconds = 0.0  # the worker's time in host layers, from their input's arrival (the achieved GB/s)
        widened = weight_form == WIDENED and self.held_bytes > 0
        self.layer_bytes = widened_layer_bytes(cfg, self.dtype) if widened else weights.layout.nbytes  # CPU reads
        device = cache.k.device
        self.crossing = Crossing(device, cache.batch, cfg.hidden_size, self.dtype) if device.type == "cuda" else None
        self.worker = HostWorker(pick or machine_pick(bool(weights.plan.disk_layers)))
        log.info("%s", self.describe())

    @property
    def held_bytes(self) -> int:
        """Host memory the lane's converted layers hold beside their pinned copies."""
        return sum(self.extra.values())

    def drop(self, layers) -> None:
        """Stop computing ``layers`` here (the caller has put their keys and values into the device cache; they
        stream from now on); the lane keeps its other layers and counts its timing afresh."""
        gone = set(layers)
        keep = tuple(i for i in self.layers if i not in gone)
        assert keep and gone <= set(self.layers), (layers, self.layers)
        for i in gone:
            del self.views[i], self.extra[i], self.kv[i]
        self.layers = keep
        self.reset_timing()

    def reset_timing(self) -> None:
        """Count ``steps`` and ``seconds`` from here on (both: the rate the engine keeps is their ratio)."""
        self.steps, self.seconds = 0, 0.0

    def describe(self) -> str:
        """Where the host layers run (for ``--show-plan`` and the log)."""
        held = f" ({self.held_bytes / 2**20:.1f} MiB of copies beside the pinned ones)"
        form = ("" if not self.held_bytes else f"; int4 weights on torch's CPU int4 kernel{held}"
                if self.weight_form == INT4 else f"; quantized weights widened to {self.dtype}{held}")
        return self.worker.pick.describe() + form

    def serves(self, cache, t: int) -> bool:
        """A pass over ``cache`` with ``t`` tokens per row computes the host layers here (decode steps)."""
        return t == 1 and cache is self.cache

    def run_from(self, i: int) -> tuple[int, ...]:
        """The run of consecutive host layers that starts at host layer ``i``."""
        run = [i]
        while run[-1] + 1 in self.layers:
            run.append(run[-1] + 1)
        return tuple(run)

    def run(self, layers: tuple[int, ...], h: torch.Tensor, residual: torch.Tensor | None,
            start_pos: torch.Tensor, q_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive host ``layers`` on the worker: hidden state [B, 1, H] (and residual; None before
        layer 0) in on the compute device, out on it; attention reads the host cache up to the longest row."""
        assert layers and all(i in self.kv for i in layers), layers
        self.steps += layers[0] == self.layers[0]
        stream = self.weights.stream
        name = f"layer.{layers[0]}" if len(layers) == 1 else f"layers.{layers[0]}-{layers[-1]}"
        if stream.tracer:  # the third lane of the timeline: on the compute stream, which waits for it
            stream.tracer.begin("host", name, stream.sync.compute_stream())
        try:
            if self.crossing is None:  # the compute device is the CPU: nothing crosses
                out, res = self.worker.submit(self._compute, layers, h, residual, start_pos, q_lens, None).result()
            else:
                args = self.crossing.down(h, residual, start_pos, q_lens)
                out, res = self.crossing.up(*self.worker.submit(self._compute, layers, *args).result())
        except KeyboardInterrupt:  # the step's call ends first: left running, it wrote the host KV cache after the
            self.worker.drain()  # next generation's prefill had filled it (session 41's review)
            raise
        if stream.tracer:
            stream.tracer.end("host", name, stream.sync.compute_stream())
        return out, res

    def _compute(self, layers: tuple[int, ...], h: torch.Tensor, residual: torch.Tensor | None,
                 start_pos: torch.Tensor, q_lens: torch.Tensor, ready) -> tuple[torch.Tensor, torch.Tensor]:
        """(On the worker.) Wait for the crossing's event, run ``layers`` on the host tensors. The time from
        the event on counts in ``seconds``: before it the worker waits for the GPU's earlier work, which is not
        the host's rate (the step model holds that wait: memory.lane_schedule)."""
        if ready is not None:
            with torch.cuda.device(self.crossing.device):
                ready.synchronize()
        t0 = time.perf_counter()
        b = h.shape[0]
        h, residual = h.to(self.dtype), residual.to(self.dtype) if residual is not None else None
        max_len = int((start_pos + q_lens).max())
        positions = self.cpu.positions(start_pos, 1)
        with torch.inference_mode():  # ~15% less time in the ~110 small ops around the projections than no_grad
            for i in layers:
                kv = tuple(c[:b] for c in self.kv[i])
                h, residual = self.cpu.layer(self.views[i], h, residual, positions, kv, start_pos, q_lens, max_len)
        # the caller gets normal tensors (pinned buffers on CUDA; copies on the CPU), which it may update in place
        out = self.crossing.result(h, residual) if self.crossing is not None else (h.clone(), residual.clone())
        self.seconds += time.perf_counter() - t0
        return out

    def absorb(self, i: int, kv: tuple[torch.Tensor, torch.Tensor], upto: int) -> None:
        """Copy positions ``[0, upto)`` of host layer ``i``'s device KV (rows [:B]) into the host cache,
        after a pass that streamed the layer (a prefill) wrote them."""
        if i not in self.kv:
            return
        b = kv[0].shape[0]
        for dst, src in zip(self.kv[i], kv):
            dst[:b, :, :upto].copy_(src[:, :, :upto])

    def close(self) -> None:
        """Stop the worker thread (idempotent)."""
        self.worker.close()
