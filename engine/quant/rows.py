"""The plain-torch path's linear on a packed weight: decoded a slice of output rows at a time on the CPU.

A quantized weight's packed bytes stay its only copy (never a kept full-precision one), so the
plain-torch path (``engine.ops.TorchOps``) decodes it at every call. Decoded whole, a projection is
one fp32 ``[N, K]`` tensor written to memory and read back by the matmul; on the CPU that costs more
than the matmul itself: the real SmolLM2-135M's tied Q4_1 lm_head (49152 x 576) took 75 ms a token on
this project's 2-vCPU machine decoded whole, 19 ms in slices of at most :data:`CHUNK_VALUES` weights,
each multiplied while its decoded rows are still in the caches (both with the decoders before their in-place
rewrite; end to end, bench/results/2026-12-05-cpu-packed-decode/). Weights of
at most one slice go whole; on a GPU they always do (the Triton kernels are its fast path, and a launch
per slice would cost more than it saves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.quant.ggml import GGMLWeight
from engine.quant.spec import QuantWeight, dequantize

CHUNK_VALUES = 1 << 20  # weights decoded per slice on the CPU (4 MiB of fp32)


def decoded_rows(w: QuantWeight | GGMLWeight, start: int, stop: int) -> torch.Tensor:
    """fp32 ``[stop - start, K]``: rows ``start:stop`` of the packed weight ``w``, decoded."""
    if isinstance(w, QuantWeight):
        return dequantize(w.row_slice(start, stop))
    return w.dequantize_rows(start, stop)


def packed_linear(x: torch.Tensor, w: QuantWeight | GGMLWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w decoded, b)`` in ``x``'s dtype, decoding ``w`` a slice of rows at a time on the CPU."""
    n, k = w.shape
    rows = max(1, CHUNK_VALUES // k)
    if x.device.type != "cpu" or n <= rows:
        return F.linear(x, decoded_rows(w, 0, n).to(x.dtype), b)
    parts = [F.linear(x, decoded_rows(w, r, min(r + rows, n)).to(x.dtype), None if b is None else b[r:r + rows])
             for r in range(0, n, rows)]
    return torch.cat(parts, dim=-1)
