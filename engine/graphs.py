"""CUDA graphs for the decode step, with every layer resident or with streamed layers.

At batch 1 a decode step is a few hundred small kernels; launched one by one from Python,
their launch overhead exceeds the ~5 ms the HBM needs to read a 7B model. With streamed
layers the host must also stay ahead of the copy engine: the first streamed layer's
compute frees the slot the next copy needs, and it cannot start before the host has
launched every resident layer in front of it. So the step is captured in pieces:

* one graph per run of consecutive resident layers (the positions and, when the table is
  on the device, the embedding go into the first; the final norm and a resident lm_head
  into the last); with nothing streamed the whole step is one graph;
* a host layer (``engine.host_lane``) is not captured: its CPU forward runs between the pieces,
  reading and writing the static hidden state and residual;
* per streamed layer, one graph per staging slot. The streamer decides at run time which
  slot holds the layer: ``weights.layer(i)`` makes the compute stream wait for that slot's
  copy, the matching graph is replayed, and ``weights.release(i)`` frees the slot, exactly
  as in an eager step.

Pieces hand the hidden state and residual over in static buffers. All graphs share one
memory pool and are captured in execution order, so their temporaries reuse one region.
Capture happens at load time after two eager warm-up steps (kernel compilation and
tuning), before any prompt is in the KV cache (the warm-up writes to it; it is reset).
"""

from __future__ import annotations

import logging

import torch

from engine.upload import copy_into
from kernels.graph_capture import never_free

log = logging.getLogger(__name__)

_KEY = "self_attn.qkv_proj.weight"  # a slot's graph is found by where this weight lives


def slot_address(weight) -> int:
    """Where a layer's ``_KEY`` weight lives: a tensor's data pointer, or that of the first tensor of a
    packed one (``QuantWeight.qweight``; ``GGMLWeight``'s first blocks, what its ``data_ptr`` gives).
    ``QuantWeight`` has no ``data_ptr``: asking it for one failed every capture with streamed AWQ, GPTQ,
    compressed-tensors, ``--quantize`` or repacked GGUF layers, which then decoded eagerly."""
    if isinstance(weight, torch.Tensor):
        return weight.data_ptr()
    first = weight.qweight if hasattr(weight, "qweight") else weight.parts[0][1]
    return first.data_ptr()


def slot_graph(per_slot: dict[int, torch.cuda.CUDAGraph], w: dict) -> torch.cuda.CUDAGraph:
    """Of a streamed layer's graphs (one per staging slot), the one for the slot that holds ``w`` now."""
    return per_slot[slot_address(w[_KEY])]


class DecodeGraph:
    """A decode step for ``batch`` sequences as replayable CUDA graphs over ModelWeights."""

    def __init__(self, model, cache, batch: int, warm: bool = True) -> None:
        """``warm``: two eager steps first (compiling and tuning), then the cache reset; without it (kernels known
        compiled and tuned, e.g. a host lane's retirement mid-generation) the capture runs nothing and the cache
        keeps its contents."""
        dev, cfg = model.device, model.cfg
        self.model, self.weights, self.cache, self.batch = model, model.weights, cache, batch
        plan = self.weights.plan
        self.embed_in_graph, self.head_in_graph = plan.embed_on_device, plan.lm_head_resident
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.start = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.q_lens = torch.ones(batch, dtype=torch.int32, device=dev)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.h = torch.zeros((batch, 1, cfg.hidden_size), dtype=model.dtype, device=dev)
        self.res = torch.zeros_like(self.h)
        self.logits: torch.Tensor | None = None
        if warm:
            self._warm_up()
        self.pool = None
        self.steps = [self._capture(kind, what) for kind, what in self._schedule()]
        if warm:
            cache.reset()

    def _warm_up(self) -> None:
        dev = self.model.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compile and tune outside the capture (same shapes as replay)
            for _ in range(2):
                self.model.forward(self.ids, self.start, self.q_lens, self.cache, self.cache.max_context)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)

    def _schedule(self) -> list[tuple[str, object]]:
        """[("fixed", [callables]) | ("streamed", layer) | ("host", consecutive layers)] in execution order."""
        steps, fixed, run = [], [self._start], []
        host = self.model.host.layers if self.model.host is not None else ()
        for i in range(self.model.cfg.num_hidden_layers):
            if i in self.weights.resident:
                run.append(i)
                continue
            if run:
                fixed.append(self._layers_fn(tuple(run)))
                run = []
            if fixed:  # nothing to capture between two streamed layers
                steps.append(("fixed", fixed))
            if i in host and steps and steps[-1][0] == "host" and steps[-1][1][-1] == i - 1:
                steps[-1] = ("host", (*steps[-1][1], i))  # a run of host layers: one trip to the host
            else:
                steps.append(("host", (i,)) if i in host else ("streamed", i))
            fixed = []
        if run:
            fixed.append(self._layers_fn(tuple(run)))
        if self.head_in_graph:
            fixed.append(self._head)
        if fixed:
            steps.append(("fixed", fixed))
        return steps

    def _graph(self, fns) -> torch.cuda.CUDAGraph:
        g, began = torch.cuda.CUDAGraph(), False
        try:
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                began = True
                for fn in fns:
                    fn()
        except BaseException:
            if not began:  # freeing a graph whose capture did not begin can abort the process (kernels.graph_capture)
                never_free(g)
            raise  # one that began is freed as usual, with its memory pool (try_capture then decodes eagerly)
        self.pool = self.pool or g.pool()
        return g

    def _capture(self, kind: str, what) -> tuple[str, object]:
        if kind == "fixed":
            return kind, self._graph(what)
        if kind == "host":
            return kind, what
        i = what
        per_slot = {}
        for s in range(len(self.weights.stream.slots)):
            w = self.weights.slot_layer(s, i)
            per_slot[slot_address(w[_KEY])] = self._graph([self._layers_fn((i,), lambda _, w=w: w)])
        return kind, (i, per_slot)

    # ----- the captured pieces -----
    def _start(self) -> None:
        self.pos.copy_(self.model.positions(self.start, 1))
        if self.embed_in_graph:
            self.h.copy_(self.weights.embed(self.ids, self.model.ops.embedding))

    def _layers_fn(self, layers: tuple[int, ...], weights_of=None):
        weights_of = weights_of or (lambda i: self.weights.resident[i])

        def run() -> None:
            h, res = self.h, (None if layers[0] == 0 else self.res)
            with self.model.ops.pass_scope():  # the piece's layers share one start + q_lens
                for i in layers:
                    kv = tuple(c[: self.batch] for c in self.cache.layer(i))
                    h, res = self.model.layer(weights_of(i), h, res, self.pos, kv, self.start, self.q_lens,
                                              self.cache.max_context)
            self.res.copy_(res)
            self.h.copy_(h)
        return run

    def _host_layers(self, layers: tuple[int, ...]) -> None:
        h, res = self.model.host.run(layers, self.h, None if layers[0] == 0 else self.res, self.start, self.q_lens)
        self.res.copy_(res)
        self.h.copy_(h)

    def _head(self) -> None:
        self.logits = self.model.head(self.h, self.res, self.q_lens)

    def stage(self, tok: torch.Tensor, start: torch.Tensor) -> None:
        """The step's inputs into the static buffers: tokens [B] and positions [B] (int32), where the graphs read
        them (the embedding in the first piece, or gathered here when the table stays on the host)."""
        copy_into(self.start, start)
        if self.embed_in_graph:
            copy_into(self.ids, tok.view(self.batch, 1))
        else:  # the table stays on the host: its rows are gathered there
            self.h.copy_(self.weights.embed(tok.view(self.batch, 1)))

    def __call__(self, tok: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for tokens tok [B] at positions start [B] (int32), on the device or on the host (a
        server's: they cross through pinned memory, the host not waiting behind the copy engine's weights)."""
        self.stage(tok, start)
        if self.model.host is not None:
            self.weights.host_decode(True)
        for kind, what in self.steps:
            if kind == "fixed":
                what.replay()
                continue
            if kind == "host":
                self._host_layers(what)
                continue
            i, per_slot = what
            w = self.weights.layer(i)
            slot_graph(per_slot, w).replay()
            self.weights.release(i)
        if self.head_in_graph:
            return self.logits
        return self.model.head(self.h, self.res, self.q_lens)


def try_capture(model, cache, batch: int, warm: bool = True) -> DecodeGraph | None:
    """Capture a decode graph, or return None (and say why) when it cannot be captured (``warm``: see
    :class:`DecodeGraph`)."""
    try:
        return DecodeGraph(model, cache, batch, warm)
    except Exception as e:  # capture is an optimisation: fall back to eager steps
        log.warning("CUDA graph capture failed (%s); decoding without graphs", e)
        torch.cuda.synchronize()
        return None
