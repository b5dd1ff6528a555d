"""CUDA-graph capture of one decode step, for when every weight is resident.

At batch 1 a decode step is a few hundred small kernels; launched one by one from
Python, their launch overhead exceeds the ~5 ms the HBM needs to read a 7B model. A
captured graph replays them with one launch. Capture happens at load time, before any
prompt is in the KV cache (warm-up passes write to it). With streamed layers the copy
engine, not launches, sets the pace, so steps run eagerly.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class DecodeGraph:
    """One captured decode step for ``batch`` sequences; inputs are copied into static buffers."""

    def __init__(self, model, cache, batch: int) -> None:
        dev = model.device
        self.batch = batch
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.start = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.q_lens = torch.ones(batch, dtype=torch.int32, device=dev)
        self._run = lambda: model.forward(self.ids, self.start, self.q_lens, cache, cache.max_context)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compile and autotune outside the capture
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()
        cache.reset()

    def __call__(self, tok: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for tokens tok [B] at positions start [B] (int32, on the device)."""
        self.ids.copy_(tok.view(self.batch, 1))
        self.start.copy_(start)
        self.graph.replay()
        return self.logits


def try_capture(model, cache, batch: int) -> DecodeGraph | None:
    """Capture a decode graph, or return None (and say why) when it cannot be captured."""
    try:
        return DecodeGraph(model, cache, batch)
    except Exception as e:  # capture is an optimisation: fall back to eager steps
        log.warning("CUDA graph capture failed (%s); decoding without graphs", e)
        torch.cuda.synchronize()
        return None
