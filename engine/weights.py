"""The model's weights for a memory plan: what each layer's bytes are, and where the model finds them.

This is where model knowledge meets the byte mover. Every decoder layer (and, when lm_head
streams, every chunk of lm_head rows) becomes a ``streamer.units.UnitSpec``: raw byte spans of
the checkpoint when the file already holds the packed bytes (same dtype), else a packer that
casts through the memory map. ``ModelWeights`` hands the streamer those units and gives the
model typed views of their buffers (``engine.groups.WeightSource``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.layout import LayerLayout
from engine.quant.cache import packed_layers_file
from engine.quant.ggml import GGMLWeight, NativeLayouts, row_bytes
from engine.quant.layout import LayerQuant, QuantLayerLayout
from engine.tables import device_table, read
from engine.upload import staged, upload
from memory.plan import Plan
from streamer.stream import WeightStreamer
from streamer.sync import SyncLog
from streamer.units import Span, Tier, UnitSpec


def head_row_bytes(cfg: ModelConfig, dtype: torch.dtype, head_blocks: str | None) -> int:
    """Bytes of one lm_head row as held: ``dtype`` values, or GGUF blocks of type ``head_blocks``."""
    return row_bytes(head_blocks, cfg.hidden_size) if head_blocks else cfg.hidden_size * dtype.itemsize


def layer_layout(cfg: ModelConfig, dtype: torch.dtype,
                 quant: LayerQuant | None) -> LayerLayout | QuantLayerLayout | NativeLayouts:
    """The layers' packed layout in ``dtype``: GGUF blocks as they are (one layout per layer), a quantized
    layer, or a dense one."""
    if quant is not None and quant.native:  # per-layer layouts (engine.quant.ggml)
        return NativeLayouts.build(cfg, dtype, quant.native)
    return QuantLayerLayout.build(cfg, dtype, quant) if quant else LayerLayout.build(cfg, dtype)


class UnitBuilder:
    """Unit specs of one model's layers and lm_head chunks in a compute dtype."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, layout: LayerLayout | QuantLayerLayout | NativeLayouts,
                 packed_file: Path | None = None, head_blocks: str | None = None) -> None:
        self.ckpt, self.cfg, self.layout, self.dtype = ckpt, cfg, layout, layout.dtype
        self.head_blocks = head_blocks  # GGUF: lm_head's ggml type when it is held as its blocks
        self.packed_file = packed_file  # engine.quant.cache: every layer's packed bytes, in order
        self.head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"

    def layer(self, i: int, tier: Tier) -> UnitSpec:
        if isinstance(self.layout, NativeLayouts):  # GGUF blocks copied as they are, norms cast
            return UnitSpec(f"layer.{i}", self.layout.of(i).nbytes, tier, pack=lambda buf: self.pack_native(i, buf))
        if isinstance(self.layout, QuantLayerLayout):  # raw file bytes where they are canonical, else a packer
            if self.packed_file is not None:
                nbytes = self.layout.nbytes
                return UnitSpec(f"layer.{i}", nbytes, tier, spans=(Span(self.packed_file, i * nbytes, nbytes, 0),))
            pairs = self.layout.file_spans(f"model.layers.{i}", {n: t.dtype for n, t in self.ckpt.tensors.items()})
            if pairs:
                spans = tuple(Span(*self.ckpt.raw_span(name), dest) for name, dest in pairs)
                return UnitSpec(f"layer.{i}", self.layout.nbytes, tier, spans=spans)
            return UnitSpec(f"layer.{i}", self.layout.nbytes, tier, pack=lambda buf: self.pack_quant(i, buf))
        names = {n: f"model.layers.{i}.{n}" for n in self.layout.names}
        spans = [self._span(full, self.layout.entries[n].offset) for n, full in names.items()]
        if all(spans):
            return UnitSpec(f"layer.{i}", self.layout.nbytes, tier, spans=tuple(spans))

        def pack(buf: torch.Tensor) -> None:  # GGUF blocks widened straight to the compute dtype (engine.tables)
            self.layout.pack({n: read(self.ckpt, full, self.dtype) for n, full in names.items()}, buf)
            for full in names.values():
                self.ckpt.release(full)
        return UnitSpec(f"layer.{i}", self.layout.nbytes, tier, pack=pack)

    def pack_quant(self, i: int, buf: torch.Tensor) -> None:
        """Pack quantized layer i into ``buf`` on the host (convert or round its projections)."""
        prefix = f"model.layers.{i}."
        self.layout.pack(lambda n: self.ckpt.tensor(n) if n in self.ckpt.tensors else None, f"model.layers.{i}", buf)
        for name in [n for n in self.ckpt.tensors if n.startswith(prefix)]:
            self.ckpt.release(name)

    def pack_native(self, i: int, buf: torch.Tensor) -> None:
        """Copy layer i's GGUF blocks (and cast its norms / biases) into ``buf``."""
        prefix = f"model.layers.{i}"
        self.layout.of(i).pack(self.ckpt.tensor, self.ckpt.module_blocks, prefix, buf)
        for name in [n for n in self.ckpt.tensors if n.startswith(prefix + ".")]:
            self.ckpt.release(name)

    def lm_head_chunks(self, chunks: int, tier: Tier) -> list[UnitSpec]:
        """lm_head in ``chunks`` units of consecutive vocabulary rows."""
        vocab, row = self.cfg.vocab_size, head_row_bytes(self.cfg, self.dtype, self.head_blocks)
        rows = -(-vocab // chunks)
        out = []
        for c in range(chunks):
            r0, n = c * rows, min(rows, vocab - c * rows)
            if self.head_blocks:  # the file's block rows, read as they are
                file, offset, _ = self.ckpt.block_span(self.head_name)
                out.append(UnitSpec(f"lm_head.{c}", n * row, tier, spans=(Span(file, offset + r0 * row, n * row, 0),)))
                continue
            span = self._span(self.head_name, 0, r0 * row, n * row)
            if span:
                out.append(UnitSpec(f"lm_head.{c}", n * row, tier, spans=(span,)))
                continue

            def pack(buf: torch.Tensor, r0: int = r0, n: int = n) -> None:
                rows_of = getattr(self.ckpt, "tensor_rows", None)  # GGUF: widen only these rows
                src = rows_of(self.head_name, r0, r0 + n, self.dtype) if rows_of else \
                    self.ckpt.tensor(self.head_name)[r0:r0 + n]
                buf[: n * row].view(self.dtype).view(n, -1).copy_(src)
            out.append(UnitSpec(f"lm_head.{c}", n * row, tier, pack=pack))
        return out

    def _span(self, name: str, dest: int, start: int = 0, nbytes: int | None = None) -> Span | None:
        """The file bytes of tensor ``name`` (from byte ``start``) when they are already in the compute dtype."""
        info = self.ckpt.tensors[name]
        where = self.ckpt.raw_span(name)
        if where is None or info.dtype != self.dtype:
            return None
        file, offset, size = where
        return Span(file, offset + start, size - start if nbytes is None else nbytes, dest)


class ModelWeights:
    """Implements ``engine.groups.WeightSource`` for a plan from ``memory.planner``."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, plan: Plan, device: torch.device | str,
                 dtype: torch.dtype, threads: int = 8, progress=None, log_sync: SyncLog | None = None,
                 trace: bool = False, quant: LayerQuant | None = None, quant_cache: bool = False) -> None:
        self.ckpt, self.cfg, self.plan, self.dtype = ckpt, cfg, plan, dtype
        self.device = torch.device(device)
        self.layout = layer_layout(cfg, dtype, quant)
        self.layout_of = self.layout.of if isinstance(self.layout, NativeLayouts) else lambda i: self.layout
        self.head_blocks = quant.native_head if quant is not None else None
        build = UnitBuilder(ckpt, cfg, self.layout, head_blocks=self.head_blocks)
        if quant_cache and quant is not None and not quant.native:  # native layers need no repacking
            build.packed_file = packed_layers_file(ckpt, self.layout, cfg.num_hidden_layers, build.pack_quant, threads)
        tiers = {i: ("disk" if i in plan.disk_layers else "pinned") for i in plan.streamed_layers}
        units = [build.layer(i, tiers[i]) for i in plan.streamed_layers]
        if not plan.lm_head_resident:
            units += build.lm_head_chunks(plan.lm_head_chunks, plan.module("lm_head").tier)
        self.units = units
        self.stream = WeightStreamer([build.layer(i, "vram") for i in plan.resident_layers], units,
                                     plan.num_slots, plan.slot_bytes, self.device, threads=threads,
                                     progress=progress, log_sync=log_sync, trace=trace)
        self.resident = {i: self.layout_of(i).views(buf)
                         for i, buf in zip(plan.resident_layers, self.stream.resident_views)}
        self.unit_of = {u.name: j for j, u in enumerate(units)}
        self.slot_views: dict[tuple[int, object], dict[str, torch.Tensor]] = {}  # (slot, layout) -> views
        self.dry = False  # engine/ahead.py's compile-ahead pass: streamed weights are slot 0's bytes, uncopied
        self._load_small(progress or (lambda n: None))

    def _load_small(self, progress) -> None:
        """The embedding table, the final norm and a resident lm_head (tables read by engine.tables: no float32
        host copy of a GGUF block table; one kept on the host is counted by engine.host_ram)."""
        p, dev, embed = self.plan, self.device, "model.embed_tokens.weight"
        self.embed_table = device_table(self.ckpt, embed, self.dtype, dev) if p.embed_on_device else \
            read(self.ckpt, embed, self.dtype)
        self.final_norm = self.ckpt.tensor("model.norm.weight").to(dev, self.dtype)
        self.lm_head = None
        if p.lm_head_resident:
            tied_here = self.cfg.tie_word_embeddings and p.embed_on_device
            head = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
            if self.head_blocks:
                blocks = self.ckpt.module_blocks("lm_head").to(dev)
                self.lm_head = GGMLWeight(((self.head_blocks, blocks),), self.cfg.hidden_size)
                progress(blocks.numel())
            else:
                self.lm_head = self.embed_table if tied_here else device_table(self.ckpt, head, self.dtype, dev)
                progress(self.lm_head.numel() * self.lm_head.element_size())

    # ----- WeightSource -----
    def embed(self, ids: torch.Tensor, lookup=torch.nn.functional.embedding) -> torch.Tensor:
        # ids on the host (a prompt's) cross through pinned memory: the host does not wait (engine.upload)
        if self.plan.embed_on_device:
            return lookup(upload(ids, self.device), self.embed_table)
        ids = ids.cpu()  # host table: gather on the host, into the pinned memory the copy reads where it can
        host = staged((*ids.shape, self.embed_table.shape[1]), self.dtype, self.device) \
            if self.embed_table.dtype == self.dtype else None
        if host is None:
            return upload(torch.nn.functional.embedding(ids, self.embed_table).to(self.dtype), self.device)
        torch.index_select(self.embed_table, 0, ids.reshape(-1), out=host.view(-1, host.shape[-1]))
        return host.to(self.device, non_blocking=True)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.resident:
            return self.resident[i]
        return self.slot_layer(0 if self.dry else self.stream.acquire(self.unit_of[f"layer.{i}"]), i)

    def slot_layer(self, slot: int, i: int) -> dict[str, torch.Tensor]:
        """Layer i's views of staging slot ``slot`` (what ``layer(i)`` returns when i uses it); no
        synchronisation: for capturing graphs that read whichever layer the slot holds."""
        layout = self.layout_of(i)
        views = self.slot_views.get((slot, id(layout)))
        if views is None:
            views = self.slot_views[(slot, id(layout))] = layout.views(self.stream.slots[slot])
        return views

    def release(self, i: int) -> None:
        if i not in self.resident and not self.dry:
            self.stream.release()

    def meter(self, on: bool) -> None:
        """Hold the weight copies for ``pump_to`` (``on``), or issue them all again (see WeightStreamer.meter)."""
        if self._copies():
            self.stream.meter(on)

    def pump_start(self) -> None:
        if self._copies():
            self.stream.pump_start()

    def pump_to(self, fraction: float) -> None:
        if self._copies():
            self.stream.pump_to(fraction)

    def _copies(self) -> bool:
        """Whether units stream (a dry pass or an all-resident plan copies nothing)."""
        return bool(self.stream.num_slots) and not self.dry

    def host_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer-shaped views of host layer i's pinned host copy (what the CPU computes it from)."""
        assert i in self.plan.host_layers, f"layer {i} is not a host layer of the plan"
        return self.layout_of(i).views(self.stream.host_bufs[self.unit_of[f"layer.{i}"]])

    def host_decode(self, on: bool) -> None:
        """Stream every streamed unit each pass (``on`` False: a prefill), or all but the plan's host
        layers (a decode step that computes them on the CPU)."""
        skip = {self.unit_of[f"layer.{i}"] for i in self.plan.host_layers} if on else set()
        self.stream.set_order([j for j in range(len(self.units)) if j not in skip])

    def norm(self) -> torch.Tensor:
        return self.final_norm

    def lm_head_parts(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.lm_head is not None:
            yield 0, self.lm_head
            return
        row0, row_b = 0, head_row_bytes(self.cfg, self.dtype, self.head_blocks)
        for j, u in enumerate(self.units):
            if not u.name.startswith("lm_head."):
                continue
            # its slot's bytes, or the pieces lent for it (lend_head): each piece whole rows
            for buf in [self.stream.slots[0][: u.nbytes]] if self.dry else self.stream.acquire_pieces(j):
                rows = buf.numel() // row_b
                yield row0, (GGMLWeight(((self.head_blocks, buf.view(rows, -1)),), self.cfg.hidden_size)
                             if self.head_blocks else buf.view(self.dtype).view(rows, self.cfg.hidden_size))
                row0 += rows
            if not self.dry:
                self.stream.release()

    def lend_head(self, carve: Callable[[int, int], list[torch.Tensor] | None]) -> int:
        """Lend the streamer pieces for the streamed lm_head's chunks past the first ``num_slots`` (those ride the
        ring during the last layers), the last chunks first, for one pass: their copies go out early
        (streamer.lent). ``carve(nbytes, row_bytes)`` gives a chunk's pieces (flat uint8 device views of whole
        rows, together ``nbytes``), or None when no more fit. Returns the bytes lent; :meth:`take_head_back`
        takes them back."""
        if self.lm_head is not None or not self._copies():
            return 0
        heads = [j for j, u in enumerate(self.units) if u.name.startswith("lm_head.")][self.stream.num_slots:]
        row_b, carved = head_row_bytes(self.cfg, self.dtype, self.head_blocks), {}
        for j in reversed(heads):  # the last chunks: the ring would copy them last
            pieces = carve(self.units[j].nbytes, row_b)
            if pieces is None:
                break
            carved[j] = pieces
        lent = 0
        for j in sorted(carved):  # lent in the pass's order: the copies go out in it
            if not self.stream.lend(j, carved[j]):
                break
            lent += self.units[j].nbytes
        return lent

    def take_head_back(self) -> None:
        """Take back what :meth:`lend_head` lent (after the pass's head)."""
        self.stream.take_back()

    def close(self) -> None:
        """Stop streaming and unlock the host buffers (the checkpoint stays open: tables may view it)."""
        self.stream.close()
