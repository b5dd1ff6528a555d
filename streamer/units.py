"""What the streamer moves: units of bytes, described without any knowledge of models.

A *unit* is one packed buffer that is either kept in VRAM (tier ``vram``) or copied into a
staging slot before each use, from page-locked host memory (``pinned``) or from the files
(``disk``). Its bytes come from byte spans of files, each placed at an offset of the packed
buffer, or, when the bytes must be transformed on the way (a dtype cast, a repacking), from a
``pack`` function the caller supplies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Tier = Literal["vram", "pinned", "disk"]
Packer = Callable[[torch.Tensor], None]  # fills the given flat uint8 buffer with a unit's packed bytes


@dataclass(frozen=True)
class Span:
    """``nbytes`` bytes at absolute byte ``offset`` of ``file``, landing at byte ``dest`` of the unit."""

    file: Path
    offset: int
    nbytes: int
    dest: int


@dataclass(frozen=True)
class UnitSpec:
    """One unit: a label (for traces and logs), its packed size, its tier and where its bytes come from.

    Exactly one of ``spans`` (raw bytes, read straight from the files) and ``pack`` is given.
    """

    name: str
    nbytes: int
    tier: Tier
    spans: tuple[Span, ...] = ()
    pack: Packer | None = None

    def __post_init__(self) -> None:
        assert (self.pack is None) == bool(self.spans), f"unit {self.name}: give spans or a packer, not both"
        assert all(0 <= s.dest and s.dest + s.nbytes <= self.nbytes for s in self.spans), self.name
