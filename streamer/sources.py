"""Filling a unit's packed buffer from the checkpoint: through the memory map, or by direct reads.

Pinned and resident units are packed once, at load, through the memory map; the mapped
pages are dropped right after, so the process does not keep a second copy of the model
in its RSS. Disk-tier units are re-read every step: they use ``pread`` straight into the
pinned ring buffer (several threads, 16 MiB requests, so an NVMe drive sees a deep queue)
and drop the bytes from the page cache afterwards, since the host budget that put them on
disk did so because RAM is short.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.layout import LayerLayout


@dataclass(frozen=True)
class Unit:
    """One streamed piece: a decoder layer, or a chunk of lm_head rows."""

    kind: str  # "layer" | "lm_head"
    index: int  # layer number, or chunk number
    nbytes: int
    row0: int = 0  # lm_head chunks: first vocab row
    rows: int = 0


class UnitSource:
    """Packs layers and lm_head chunks of ``ckpt`` into flat buffers in the compute dtype."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, layout: LayerLayout, dtype: torch.dtype,
                 read_threads: int = 4) -> None:
        self.ckpt, self.cfg, self.layout, self.dtype = ckpt, cfg, layout, dtype
        self.head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        self.pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="disk-read")

    def layer_names(self, i: int) -> dict[str, str]:
        """Layout name -> checkpoint name for layer i."""
        return {n: f"model.layers.{i}.{n}" for n in self.layout.names}

    def pack_mapped(self, u: Unit, buf: torch.Tensor) -> None:
        """Pack (and cast) through the memory map, then drop the mapped pages."""
        if u.kind == "layer":
            names = self.layer_names(u.index)
            self.layout.pack({n: self.ckpt.tensor(full) for n, full in names.items()}, buf)
            for full in names.values():
                self.ckpt.release(full)
            return
        src = self.ckpt.tensor(self.head_name)
        buf[: u.nbytes].view(self.dtype).view(u.rows, -1).copy_(src[u.row0:u.row0 + u.rows])

    def read_direct(self, u: Unit, buf: torch.Tensor) -> None:
        """Read a unit from the files with pread (same dtype), else fall back to the map."""
        if u.kind == "layer":
            names = self.layer_names(u.index)
            if any(self.ckpt.tensors[f].dtype != self.dtype for f in names.values()):
                return self.pack_mapped(u, buf)
            views = self.layout.views(buf)
            jobs = [(full, views[n].view(-1).view(torch.uint8), 0) for n, full in names.items()]
        else:
            if self.ckpt.tensors[self.head_name].dtype != self.dtype:
                return self.pack_mapped(u, buf)
            row = self.cfg.hidden_size * self.dtype.itemsize
            jobs = [(self.head_name, buf[: u.nbytes], u.row0 * row)]
        for f in [self.pool.submit(self.ckpt.read_into, name, out, start) for name, out, start in jobs]:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False)
