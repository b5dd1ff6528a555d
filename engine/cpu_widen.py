"""Opt-in (``LAYERSTREAM_CPU_WIDEN=1``): a CPU run's resident quantized layers held widened to the
compute dtype, when the RAM allows.

By default the plain-torch path keeps every quantized layer packed and decodes it per call (issue 15:
nothing is dequantized into a full-precision copy on the host; ``engine.quant.rows.packed_linear``), so
each decode step writes and reads the layers' full-precision bytes anyway. Someone trying a quantized
model on a machine without a GPU may rather spend RAM for speed: with this on, the decoded copy is held
once, beside the packed one, and each step runs dense matmuls over the same values. The real
SmolLM2-135M Q4_1 GGUF decoded at a median 17.0 tok/s against 9.1 packed (1.9x, eight alternated runs
each, the same text) on this project's 2-vCPU machine, for 405 MiB more RAM
(bench/results/2026-12-05-cpu-widen). Even when asked, it is done only when every resident layer's copy
fits :data:`engine.host_forms.WIDEN_RAM_SHARE` of the RAM available, no ``--vram-budget`` bounds the
resident bytes (on the CPU that budget is the RAM the user gave them) and no ``--quantize`` asked for
fewer bytes; only for the plain-torch path (the Triton kernels, the interpreter's included, read the
packed form). Streamed layers stay packed: their slots hold another layer at each use.
"""

from __future__ import annotations

import os
import time

import psutil
import torch

from engine.host_forms import WIDEN_RAM_SHARE, hold_layer, widen
from engine.quant.ggml import GGMLWeight
from engine.quant.spec import QuantWeight


def _packed(views: dict[str, object]) -> list[QuantWeight | GGMLWeight]:
    return [t for t in views.values() if isinstance(t, QuantWeight | GGMLWeight)]


def widened_bytes(weights, dtype: torch.dtype) -> int:
    """What widening every resident quantized weight of ``weights`` (``engine.weights.ModelWeights``),
    and a resident packed lm_head, to ``dtype`` would add."""
    ws = [w for views in weights.resident.values() for w in _packed(views)]
    if isinstance(weights.lm_head, GGMLWeight):
        ws.append(weights.lm_head)
    return sum(w.shape[0] * w.shape[1] for w in ws) * dtype.itemsize


def widen_resident(weights, dtype: torch.dtype, bounded: bool, available: int | None = None) -> str | None:
    """Widen ``weights``' resident quantized layers (and a packed resident lm_head) to ``dtype`` in place
    when the module docstring's conditions hold (``bounded``: a --vram-budget or --quantize run); returns
    a note saying what it held, or None."""
    if weights.device.type != "cpu" or bounded or os.environ.get("LAYERSTREAM_CPU_WIDEN", "0") != "1":
        return None
    extra = widened_bytes(weights, dtype)
    ram = psutil.virtual_memory().available if available is None else available
    if not extra or extra > WIDEN_RAM_SHARE * ram:
        return None
    t0 = time.perf_counter()
    for i, views in weights.resident.items():
        if _packed(views):
            weights.resident[i] = hold_layer(views, dtype, "widened")[0]
    if isinstance(weights.lm_head, GGMLWeight):
        weights.lm_head = widen(weights.lm_head, dtype)
    return (f"widened to {str(dtype).removeprefix('torch.')} for the CPU in {time.perf_counter() - t0:.1f} s "
            f"(LAYERSTREAM_CPU_WIDEN=1: +{extra / 2**20:.0f} MiB of RAM for faster steps)")
