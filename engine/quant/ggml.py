"""GGUF quantized layers held as the file's own blocks ("native" form): streamed packed, decoded in kernels.

A Q4_K_M file stores most projections as Q4_K (4.5 bits per weight) and some (``attn_v``, ``ffn_down``
in about half of the layers) as Q6_K (6.56 bits); rows that are not a whole number of 256-value
blocks (Qwen2.5-72B's ffn_down, 29568) fall back to llama.cpp's block-32 types (Q5_0, Q8_0).
Repacked into the engine's canonical int4/int8 form (``engine.gguf.repack``) such a layer needs the
widest form of every type it mixes (int8, group 16, fp32 scales and mins: 12 bits per weight). Held
natively, a layer costs its bytes in the file. The types are those ``kernels.ggml_blocks.BLOCKS``
decodes (K-quants Q4_K / Q5_K / Q6_K and Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1).

Each module's blocks are its GGUF tensor's rows unchanged (``[out_features, K / block * block bytes]``
uint8; llama's Q/K rows put back in the Hugging Face order, which moves whole rows). Layers differ
in which modules get more bits, so each distinct combination of types (a *signature*) has its own
:class:`NativeLayerLayout`; :class:`NativeLayouts` maps layers to them and sizes the staging slots
by the largest. Within a fused projection (``qkv_proj``, ``gate_up_proj``) consecutive modules of
one type sit back to back, so they form one part: ``GGMLWeight.parts`` is one ``(qtype, blocks)``
per run of a type, the rows of the fused output in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch

from engine.config import ModelConfig
from engine.layout import ALIGN
from engine.quant.layout import FUSED_LINEARS, QEntry, dense_shapes, linear_shapes
from kernels.ggml_blocks import dequant_ref, row_bytes
from memory.units import parse_size

DEQUANT_SCRATCH = 64 << 20  # bytes: the dense tile a prefill decodes packed layers into for the GEMM, at most
# (GGUF blocks here, int4 / int8 layers in kernels.qlinear); LAYERSTREAM_DEQUANT_SCRATCH overrides it
MODULES = tuple(m for parts in FUSED_LINEARS.values() for m in parts)  # q, k, v, o, gate, up, down
Signature = tuple[str, ...]  # a layer's ggml type per module of MODULES


def dequant_scratch() -> int:
    """Bytes of the prefill's dense tile (planned in the footprint, used by the ops): ``DEQUANT_SCRATCH``, or
    ``LAYERSTREAM_DEQUANT_SCRATCH`` (a size such as ``256MiB``). A larger tile means fewer dequantize + GEMM
    launches per prompt pass (a whole projection per tile from ~271 MB on a 7B) for less VRAM left to layers."""
    text = os.environ.get("LAYERSTREAM_DEQUANT_SCRATCH")
    if not text:
        return DEQUANT_SCRATCH
    try:
        n = parse_size(text)
    except ValueError as e:
        raise ValueError(f"LAYERSTREAM_DEQUANT_SCRATCH: {e}") from None
    if n < 1 << 16:
        raise ValueError(f"LAYERSTREAM_DEQUANT_SCRATCH={text!r} is below 64KiB: give a size such as 64MiB "
                         "(the default) or 512MiB, or unset it")
    return n


def dequant_scratch_range(useful: int) -> tuple[int, int]:
    """The prefill's dense tile as the planner may size it: ``(base, most)``. Unset
    ``LAYERSTREAM_DEQUANT_SCRATCH``: ``DEQUANT_SCRATCH`` growing into spare VRAM up to ``useful`` (the
    layer's largest projection widened: one tile, one GEMM); set: that size, fixed."""
    base = dequant_scratch()
    return (base, base) if os.environ.get("LAYERSTREAM_DEQUANT_SCRATCH") else (base, max(base, useful))


@dataclass(frozen=True)
class GGMLWeight:
    """A (fused) linear weight ``[N, K]`` held as ggml blocks: ``parts`` are ``(qtype, blocks)`` runs
    along N, ``blocks`` uint8 ``[n_part, row_bytes(qtype, K)]``."""

    parts: tuple[tuple[str, torch.Tensor], ...]
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(b.shape[0] for _, b in self.parts), self.in_features)

    @property
    def device(self) -> torch.device:
        return self.parts[0][1].device

    def data_ptr(self) -> int:
        """Where the first part's blocks live (how a decode graph finds the slot it was captured on)."""
        return self.parts[0][1].data_ptr()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for _, b in self.parts)

    def rows(self) -> list[tuple[int, str, torch.Tensor]]:
        """(first output row, qtype, blocks) of each part."""
        out, row = [], 0
        for qtype, blocks in self.parts:
            out.append((row, qtype, blocks))
            row += blocks.shape[0]
        return out

    def dequantize(self) -> torch.Tensor:
        """fp32 reference: the full ``[N, K]`` weight, as ggml's dequantizers give it."""
        return self.dequantize_rows(0, self.shape[0])

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 rows ``start:stop`` of the weight (those of every part they span), as :meth:`dequantize`'s."""
        parts = [dequant_ref(blocks[max(start - row, 0):stop - row], qtype, self.in_features)
                 for row, qtype, blocks in self.rows() if row < stop and row + blocks.shape[0] > start]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class NativeLayerLayout:
    """Byte offsets of one signature's layer: dense tensors in the compute dtype, then each module's
    blocks (``{module}.blocks``), the modules of a fused projection back to back."""

    entries: dict[str, QEntry]
    parts: dict[str, tuple[tuple[str, str, int], ...]]  # fused -> (qtype, first module, rows) per part
    nbytes: int
    dtype: torch.dtype
    signature: Signature
    in_features: dict[str, int]

    @classmethod
    def build(cls, cfg: ModelConfig, dtype: torch.dtype, signature: Signature) -> NativeLayerLayout:
        types, shapes = dict(zip(MODULES, signature)), linear_shapes(cfg)
        entries: dict[str, QEntry] = {}
        pos = 0
        for name, shape in dense_shapes(cfg):  # q/k/v biases back to back: the fused bias is a view
            if name not in ("self_attn.k_proj.bias", "self_attn.v_proj.bias"):
                pos = -(-pos // ALIGN) * ALIGN
            entries[name] = QEntry(pos, shape, dtype)
            pos += prod(shape) * dtype.itemsize
        if cfg.attention_bias:
            first = entries["self_attn.q_proj.bias"]
            entries["self_attn.qkv_proj.bias"] = QEntry(first.offset, (cfg.q_size + 2 * cfg.kv_size,), dtype)
        parts: dict[str, tuple[tuple[str, str, int], ...]] = {}
        for fused, modules in FUSED_LINEARS.items():
            runs: list[list] = []
            for m in modules:
                n, k = shapes[m]
                if runs and runs[-1][0] == types[m]:
                    runs[-1][2] += n  # same type: right after the previous module
                else:
                    pos = -(-pos // ALIGN) * ALIGN
                    runs.append([types[m], m, n])
                entries[f"{m}.blocks"] = QEntry(pos, (n, row_bytes(types[m], k)), torch.uint8)
                pos += n * row_bytes(types[m], k)
            parts[fused] = tuple((t, m, n) for t, m, n in runs)
        ins = {fused: shapes[modules[0]][1] for fused, modules in FUSED_LINEARS.items()}
        return cls(entries, parts, -(-pos // ALIGN) * ALIGN, dtype, tuple(signature), ins)

    def _view(self, buf: torch.Tensor, name: str, rows: int | None = None) -> torch.Tensor:
        e = self.entries[name]
        shape = e.shape if rows is None else (rows, *e.shape[1:])
        return buf[e.offset:e.offset + prod(shape) * e.dtype.itemsize].view(e.dtype).view(shape)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor | GGMLWeight]:
        """Typed views into ``buf`` (flat uint8, >= nbytes): tensors, and a GGMLWeight per fused linear."""
        assert buf.dtype == torch.uint8 and buf.numel() >= self.nbytes
        out: dict[str, torch.Tensor | GGMLWeight] = {
            n: self._view(buf, n) for n in self.entries if n.endswith((".weight", ".bias"))}
        for fused, runs in self.parts.items():
            parts = tuple((t, self._view(buf, f"{m}.blocks", rows)) for t, m, rows in runs)
            out[f"{fused}.weight"] = GGMLWeight(parts, self.in_features[fused])
        return out

    def pack(self, dense: Callable[[str], torch.Tensor], blocks: Callable[[str], torch.Tensor],
             prefix: str, buf: torch.Tensor) -> None:
        """Fill ``buf`` with layer ``prefix`` (``model.layers.{i}``): ``dense(name)`` gives a norm or bias
        (cast here), ``blocks(module)`` a module's blocks in the Hugging Face row order."""
        for name in self.entries:
            if name.endswith((".weight", ".bias")) and name != "self_attn.qkv_proj.bias":
                self._view(buf, name).copy_(dense(f"{prefix}.{name}"))
        for m in MODULES:
            dst = self._view(buf, f"{m}.blocks")
            src = blocks(f"{prefix}.{m}")
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != torch.uint8:
                raise ValueError(f"{prefix}.{m}: expected {self.signature[MODULES.index(m)]} blocks "
                                 f"{list(dst.shape)}, got {src.dtype} {list(src.shape)}")
            dst.copy_(src)


@dataclass(frozen=True)
class NativeLayouts:
    """Every layer's native layout: ``of(i)``; ``nbytes`` is the largest (a staging slot)."""

    per_layer: tuple[NativeLayerLayout, ...]

    @classmethod
    def build(cls, cfg: ModelConfig, dtype: torch.dtype, signatures: tuple[Signature, ...]) -> NativeLayouts:
        assert len(signatures) == cfg.num_hidden_layers, (len(signatures), cfg.num_hidden_layers)
        built = {s: NativeLayerLayout.build(cfg, dtype, s) for s in set(signatures)}
        return cls(tuple(built[s] for s in signatures))

    def of(self, i: int) -> NativeLayerLayout:
        return self.per_layer[i]

    @property
    def nbytes(self) -> int:
        return max(lay.nbytes for lay in self.per_layer)

    @property
    def dtype(self) -> torch.dtype:
        return self.per_layer[0].dtype

    @property
    def layer_bytes(self) -> list[int]:
        return [lay.nbytes for lay in self.per_layer]
