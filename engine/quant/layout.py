"""A decoder layer with quantized linear weights, packed into one flat buffer (the streamer's unit).

Same contract as ``engine.layout.LayerLayout`` (``nbytes``, ``dtype``, ``views(buf)``), with tensors of
several dtypes: the norms and biases in the compute dtype, and for each fused projection
(``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) its canonical packed tensors
(``engine.quant.spec``): ``qweight`` int32, ``scales`` (and ``zeros`` or ``mins``) in the scale dtype, and with act
order one int32 ``perm`` shared by the fused parts. The parts of a fused projection sit side by side
along N in each of these tensors, so the fused weight is a plain view, as in the dense layout.
``views`` returns a :class:`~engine.quant.spec.QuantWeight` under the fused ``...weight`` names
(``self_attn.qkv_proj.weight``, ...) and tensors under every other name. Every group starts on a
256-byte boundary. The packed bytes are what the planner counts and what crosses PCIe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import prod

import torch

from engine.config import ModelConfig
from engine.layout import ALIGN
from engine.quant.config import QuantizationConfig, load_quant_linear
from engine.quant.rtn import quantize_rtn
from engine.quant.spec import QuantSpec, QuantWeight

# fused projection -> its checkpoint modules, in order along N
FUSED_LINEARS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj": ("self_attn.o_proj",),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.down_proj": ("mlp.down_proj",)}


# (module prefix ``model.layers.{i}.self_attn.q_proj``, out_features, in_features) -> its canonical weight
LinearLoader = Callable[[str, int, int], QuantWeight]


@dataclass(frozen=True)
class LayerQuant:
    """How a run's decoder-layer linear weights are quantized: read from a quantized checkpoint
    (``source``), repacked by the checkpoint itself (``loader``: GGUF blocks, ``engine.gguf.repack``),
    or rounded to nearest at load from a full-precision one (both None). ``forms`` gives fused
    projections their own (spec, scale dtype) (GGUF: each projection in the narrowest exact form of
    its types); ``spec`` / ``scale_dtype`` hold the others and name the run's widest form.
    ``native``: GGUF K-quant layers held as the file's own blocks (``engine.quant.ggml``), one
    signature (ggml type per module) per layer, their blocks read through ``blocks(module)``."""

    spec: QuantSpec
    scale_dtype: torch.dtype
    act_order: bool = False
    source: QuantizationConfig | None = None
    loader: LinearLoader | None = field(default=None, compare=False, repr=False)
    forms: tuple[tuple[str, QuantSpec, torch.dtype], ...] = ()
    native: tuple[tuple[str, ...], ...] = ()
    native_head: str | None = None  # GGUF: the ggml type of an untied lm_head held as its blocks too
    blocks: Callable[[str], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def form(self, fused: str) -> tuple[QuantSpec, torch.dtype]:
        """(spec, scale dtype) of fused projection ``fused`` (``mlp.down_proj``, ...)."""
        return next(((s, d) for f, s, d in self.forms if f == fused), (self.spec, self.scale_dtype))

    @property
    def label(self) -> str:
        """Plan-line description: the spec, or each projection's form when they differ."""
        if self.native:
            types = sorted({t.upper() for sig in self.native for t in sig})
            return f"gguf {'/'.join(types)} blocks (native)"
        labels = {f.split(".")[-1].removesuffix("_proj"): self.form(f)[0].label for f in FUSED_LINEARS}
        if len(set(labels.values())) == 1:
            return next(iter(labels.values()))
        return ", ".join(f"{name} {label}" for name, label in labels.items())


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Checkpoint module (``self_attn.q_proj``, ...) -> (out_features, in_features)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"self_attn.q_proj": (cfg.q_size, h), "self_attn.k_proj": (cfg.kv_size, h),
            "self_attn.v_proj": (cfg.kv_size, h), "self_attn.o_proj": (h, cfg.q_size),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def dense_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The layer's tensors that stay in the compute dtype (norms, biases), relative names."""
    h = cfg.hidden_size
    out = [("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))]
    if cfg.attention_bias:
        out += [("self_attn.q_proj.bias", (cfg.q_size,)), ("self_attn.k_proj.bias", (cfg.kv_size,)),
                ("self_attn.v_proj.bias", (cfg.kv_size,))]
    if cfg.has_qk_norm:
        out += [("self_attn.q_norm.weight", (cfg.head_dim,)), ("self_attn.k_norm.weight", (cfg.head_dim,))]
    return out


@dataclass(frozen=True)
class QEntry:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class QuantLayerLayout:
    """Byte offsets and dtypes of every tensor of a packed quantized layer."""

    entries: dict[str, QEntry]
    nbytes: int
    dtype: torch.dtype
    quant: LayerQuant
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def build(cls, cfg: ModelConfig, dtype: torch.dtype, quant: LayerQuant) -> QuantLayerLayout:
        shapes = linear_shapes(cfg)
        entries: dict[str, QEntry] = {}
        pos = 0

        def put(name: str, shape: tuple[int, ...], dt: torch.dtype, align: bool = True) -> None:
            nonlocal pos
            pos = -(-pos // ALIGN) * ALIGN if align else pos
            entries[name] = QEntry(pos, shape, dt)
            pos += prod(shape) * dt.itemsize

        for name, shape in dense_shapes(cfg):  # q/k/v biases back to back: the fused bias is a view
            put(name, shape, dtype, align=name not in ("self_attn.k_proj.bias", "self_attn.v_proj.bias"))
        if cfg.attention_bias:
            first = entries["self_attn.q_proj.bias"]
            entries["self_attn.qkv_proj.bias"] = QEntry(first.offset, (cfg.q_size + 2 * cfg.kv_size,), dtype)
        for fused, parts in FUSED_LINEARS.items():
            n, k = sum(shapes[p][0] for p in parts), shapes[parts[0]][1]
            spec, sdt = quant.form(fused)
            g = spec.group(k)
            put(f"{fused}.qweight", (n, k // spec.pack), torch.int32)
            put(f"{fused}.scales", (n, k // g), sdt)
            if not spec.sym:
                put(f"{fused}.zeros", (n, k // g), sdt)
            if spec.mins:
                put(f"{fused}.mins", (n, k // g), sdt)
            if quant.act_order:
                put(f"{fused}.perm", (k,), torch.int32)
        return cls(entries, -(-pos // ALIGN) * ALIGN, dtype, quant, shapes)

    def _raw(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, e in self.entries.items():
            out[name] = buf[e.offset:e.offset + prod(e.shape) * e.dtype.itemsize].view(e.dtype).view(e.shape)
        return out

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor | QuantWeight]:
        """Typed views into ``buf`` (flat uint8, >= nbytes): tensors, and a QuantWeight per fused linear."""
        assert buf.dtype == torch.uint8 and buf.numel() >= self.nbytes
        raw = self._raw(buf)
        out: dict[str, torch.Tensor | QuantWeight] = {n: t for n, t in raw.items() if n.endswith((".weight", ".bias"))}
        for fused, parts in FUSED_LINEARS.items():
            out[f"{fused}.weight"] = QuantWeight(raw[f"{fused}.qweight"], raw[f"{fused}.scales"],
                                                 raw.get(f"{fused}.zeros"), raw.get(f"{fused}.perm"),
                                                 self.quant.form(fused)[0], self.shapes[parts[0]][1],
                                                 raw.get(f"{fused}.mins"))
        return out

    def pack(self, get: Callable[[str], torch.Tensor | None], prefix: str, buf: torch.Tensor) -> None:
        """Fill ``buf`` with layer ``prefix`` (``model.layers.{i}``) read through ``get``: quantized
        modules converted to the canonical layout (or rounded to nearest), the rest cast."""
        raw = self._raw(buf)
        for name, _ in dense_shapes_of(self):
            raw[name].copy_(_need(get, f"{prefix}.{name}"))
        for fused, parts in FUSED_LINEARS.items():
            row = 0
            for part in parts:
                qw = self._load(get, f"{prefix}.{part}", *self.shapes[part])
                n = qw.shape[0]
                self._place(raw, fused, row, qw, f"{prefix}.{part}")
                row += n

    def file_spans(self, prefix: str, file_dtypes: Mapping[str, torch.dtype]) -> list[tuple[str, int]] | None:
        """(checkpoint tensor, destination byte) pairs filling layer ``prefix`` straight from the files,
        when the stored bytes already are the canonical ones: compressed-tensors, symmetric, no act
        order, dense tensors stored in the compute dtype (``file_dtypes``: tensor name -> dtype). None:
        the layer must be packed on the host (:meth:`pack`)."""
        q = self.quant
        if q.source is None or q.source.quant_method != "compressed-tensors" or not q.spec.sym or q.act_order:
            return None
        pairs = [(f"{prefix}.{name}", self.entries[name].offset, self.entries[name].dtype)
                 for name, _ in dense_shapes_of(self)]
        for fused, parts in FUSED_LINEARS.items():
            for canon, stored in (("qweight", "weight_packed"), ("scales", "weight_scale")):
                e = self.entries[f"{fused}.{canon}"]
                row, row_bytes = 0, e.shape[1] * e.dtype.itemsize
                for part in parts:
                    pairs.append((f"{prefix}.{part}.{stored}", e.offset + row * row_bytes, e.dtype))
                    row += self.shapes[part][0]
        if any(file_dtypes.get(name) != dtype for name, _, dtype in pairs):
            return None
        return [(name, dest) for name, dest, _ in pairs]

    def _load(self, get, prefix: str, n: int, k: int) -> QuantWeight:
        q, spec = self.quant, self.quant.spec
        if q.loader is not None:
            return q.loader(prefix, n, k)
        if q.source is not None:
            return load_quant_linear(q.source, prefix, get, n, k)
        return quantize_rtn(_need(get, f"{prefix}.weight"), spec.bits, spec.group_size, spec.sym, prefix)

    def _place(self, raw: dict[str, torch.Tensor], fused: str, row: int, qw: QuantWeight, name: str) -> None:
        """Copy one module's canonical tensors into rows ``row..`` of the fused projection."""
        n, half = qw.shape[0], float(1 << (qw.spec.bits - 1))
        raw[f"{fused}.qweight"][row:row + n].copy_(qw.qweight)
        raw[f"{fused}.scales"][row:row + n].copy_(qw.scales)
        if f"{fused}.mins" in raw:
            assert qw.mins is not None and qw.spec == self.quant.form(fused)[0], (name, qw.spec)
            raw[f"{fused}.mins"][row:row + n].copy_(qw.mins)
        if f"{fused}.zeros" in raw:
            dst = raw[f"{fused}.zeros"][row:row + n]
            if qw.zeros is not None:
                dst.copy_(qw.zeros)
            else:
                dst.fill_(half)
        elif qw.zeros is not None:
            raise ValueError(f"{name}: zero points differ from {int(half)} although quantization_config says "
                             "sym: true; the checkpoint is inconsistent")
        if f"{fused}.perm" in raw:
            perm = qw.perm if qw.perm is not None else torch.arange(qw.shape[1], dtype=torch.int32)
            if row and not torch.equal(raw[f"{fused}.perm"], perm):
                raise ValueError(f"{name}: its act-order permutation differs from the other parts of "
                                 f"{fused}; such checkpoints are not supported")
            raw[f"{fused}.perm"].copy_(perm)
        elif qw.perm is not None:
            raise ValueError(f"{name}: g_idx is not in group order although the checkpoint declares no act order")


def dense_shapes_of(layout: QuantLayerLayout) -> list[tuple[str, tuple[int, ...]]]:
    """The layout's dense (compute-dtype) tensors, without fused views."""
    return [(n, e.shape) for n, e in layout.entries.items()
            if n.endswith((".weight", ".bias")) and n != "self_attn.qkv_proj.bias"]


def _need(get, name: str) -> torch.Tensor:
    t = get(name)
    if t is None:
        raise ValueError(f"{name}: missing from the checkpoint")
    return t
