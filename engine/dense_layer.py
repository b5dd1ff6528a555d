"""A layer's packed weights widened once for all the units of a prompt pass, not once per unit.

A prompt unit of at least ``kernels.qlinear.DENSE_MIN_M`` rows applies a packed (int4 / int8) projection by
widening the weight into the plan's dense tile and running the dense GEMM. A pass over several units does it
again for each: the 16-prompt burst's first pass on an H100 (6,647 tokens in 4 units) spent 24.7 ms of its
216.9 ms of compute in the widening (bench/results/2026-12-06-h100-s47/call4), about 4 times what one widening
a layer costs. Within one layer every unit reads the same weights, so where a pass has memory to spare (the
planned prompt states' room it leaves, engine.head_ahead) the first unit widens each projection whole into a
buffer of its own, the others reuse it, and the buffers are freed when the layer's units are done.

``LAYERSTREAM_DENSE_LAYER=1`` turns it on (off by default until timed on a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from engine.quant.spec import QuantWeight

Widen = Callable[[QuantWeight, torch.dtype, torch.Tensor], torch.Tensor]  # (weight, dtype, out) -> out


def wanted() -> bool:
    """Whether a pass of several prompt units widens each layer once (``LAYERSTREAM_DENSE_LAYER=1``)."""
    return os.environ.get("LAYERSTREAM_DENSE_LAYER", "0").strip().lower() in ("1", "on", "true", "yes")


def layer_bytes(cfg, itemsize: int) -> int:
    """A decoder layer's projections widened: q, k, v, o, gate, up and down, ``itemsize`` bytes a value."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return (qkv * h + h * cfg.num_attention_heads * d + 3 * i * h) * itemsize


class DenseLayer:
    """Widened weights of the current layer, by where their packed codes live and their shape; at most ``room``
    bytes."""

    def __init__(self, room: int, widen: Widen) -> None:
        self.left, self._widen = room, widen
        self.cache: dict[tuple, torch.Tensor] = {}
        self.widened = 0  # weights widened into the cache (tests, traces)

    def get(self, w: QuantWeight, dtype: torch.dtype) -> torch.Tensor | None:
        """``w`` widened to ``dtype`` ([N, K]): from the cache, or widened now when it fits; None when it does
        not (the caller's tiled path then runs), or for an act-order weight (x is permuted, not the weight)."""
        if w.perm is not None:
            return None
        # where its codes and scales live and its shape (a piece of a weight may start where the weight does)
        key = (w.qweight.data_ptr(), w.scales.data_ptr(), w.shape, w.qweight.stride(0), dtype)
        dense = self.cache.get(key)
        if dense is None:
            n, k = w.shape
            size = n * k * dtype.itemsize
            if size > self.left:
                return None
            try:
                dense = torch.empty((n, k), dtype=dtype, device=w.qweight.device)
            except torch.OutOfMemoryError:
                self.left = 0
                return None
            self.cache[key] = self._widen(w, dtype, dense)
            self.left -= size
            self.widened += 1
        return dense
