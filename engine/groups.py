"""The model's two contracts with its callers: where it gets its weights (``WeightSource``) and one group of
rows a pass feeds (``Group``); ``engine.model.Model`` runs them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


class WeightSource(Protocol):
    """Where the model gets its weights; see ``engine.weights.ModelWeights``."""

    def embed(self, ids: torch.Tensor, lookup) -> torch.Tensor:
        """Token ids [B, T] (host or device) -> hidden states [B, T, H] on the compute device;
        ``lookup(ids, table)`` gathers rows when the table is on the device."""

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors (HF names plus fused views), ready for use on the compute stream."""

    def release(self, i: int) -> None:
        """The compute stream has been given all work that reads layer i."""

    def norm(self) -> torch.Tensor:
        """The final RMSNorm weight."""

    def lm_head_parts(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first vocab row, weight rows [n, H]) covering the whole vocabulary."""

    def meter(self, on: bool) -> None:
        """While on, streamed weights' copies are issued only by ``pump_to`` (or when a layer is fetched)."""

    def pump_start(self) -> None:
        """Mark the held copies that the following ``pump_to`` calls share out."""

    def pump_to(self, fraction: float) -> None:
        """Issue held copies until ``fraction`` of the marked ones are on their way."""

    def lend_head(self, carve: Callable[[int, int], list[torch.Tensor] | None]) -> int:
        """For one pass, copy a streamed lm_head's last chunks ahead into the pieces ``carve`` gives; bytes lent."""

    def take_head_back(self) -> None:
        """Take back what ``lend_head`` lent."""


@dataclass(frozen=True)
class Group:
    """Rows ``row0 .. row0 + B`` of the KV cache fed ids [B, T] (on the host or the device) at positions
    ``start_pos[r] + j``; ``q_lens[r]`` of row r's tokens are real (the rest is right padding);
    ``max_len`` is max(start_pos + q_lens), known on the host. ``kv(i)``, when given, is the group's
    layer-i keys and values in place of those rows of ``cache.layer(i)`` (a paged cache's own view)."""

    ids: torch.Tensor
    start_pos: torch.Tensor
    q_lens: torch.Tensor
    row0: int
    max_len: int
    kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
