"""One multinomial draw per row that a broken row cannot turn into a device-side assert.

``torch.multinomial`` on CUDA asserts on the device when a row holds NaN, inf or a negative value, or sums
to zero, and a device-side assert loses the CUDA context: every later call of the process fails. Logits go
non-finite when a model's activations overflow (fp16) or a kernel misbehaves; the caller finds such rows
(``engine.serving.runner`` fails their requests with a message), and here they only have to draw
something: their first column, the top candidate of sorted probabilities. Torch only, no Triton.
"""
from __future__ import annotations

import torch


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices int64 [B, 1] drawn from the rows of ``probs`` [B, V] (non-negative, any scale); a row that is
    not a distribution (a NaN or inf entry, a negative one, or no mass) gets column 0. No host sync."""
    assert probs.dim() == 2 and probs.shape[1] > 0, "probs must be [B, V]"
    ok = (torch.isfinite(probs) & (probs >= 0)).all(-1, keepdim=True) & (probs.sum(-1, keepdim=True) > 0)
    first = torch.zeros_like(probs)
    first[:, 0] = 1
    return torch.multinomial(torch.where(ok, probs, first), 1, generator=generator)
