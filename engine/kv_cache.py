"""Preallocated KV cache: one [B, Hk, S, D] tensor pair per layer, plus per-sequence lengths."""

from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    """Keys and values for ``batch`` sequences of up to ``max_context`` tokens.

    Sequence b holds ``lengths[b]`` valid positions; positions past that may hold stale
    values (from padding) but are never attended, because attention reads only
    positions below each sequence's own length.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_context: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if batch < 1 or max_context < 1:
            raise ValueError(f"batch ({batch}) and max_context ({max_context}) must be positive")
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_context, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_context = batch, max_context
        self.lengths = [0] * batch

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def reset(self) -> None:
        self.lengths = [0] * self.batch
