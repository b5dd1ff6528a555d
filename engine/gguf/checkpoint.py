"""A GGUF model seen through the engine's checkpoint interface (that of ``engine.checkpoint.Checkpoint``).

Tensors are listed under their Hugging Face names, with Hugging Face shapes. ``tensor(name)``
returns the weight in the Hugging Face layout as floats: tensors stored as F32/F16/BF16 are
zero-copy views of the (private, copy-on-write) file map; quantized ones are widened from their
blocks to float32 (exact for every supported format), or straight into the compute dtype when the
engine asks (``tensor(name, dtype)``: the same values as float32 cast after, at half or less the
bytes; a 70B's token_embd widened to float32 was a 4 GiB host copy), and llama's Q/K rows are put
back in the Hugging Face order.

Decoder-layer linear weights of quantized types are not widened: :meth:`layer_target` names the
canonical packed form that holds every layer's types exactly and :meth:`packed_linear` repacks one
projection's blocks into it (``engine.gguf.repack``; the engine's loader threads call it as they
pack the layers). The rest (norms, embedding, output, and layers of float types) is widened.
Widening happens once per tensor as resident and pinned layers are packed (lm_head chunks packed
through ``tensor()`` widen the whole table each; ``tensor_rows`` widens only a chunk's rows). The
disk tier re-reads its units every step: ``read_into`` reads the quantized bytes of the rows asked
for with ``pread`` (dropped from the page cache after) and widens those. ``raw_span`` returns None:
no tensor has a raw byte span in the compute layout, so the engine must go through ``tensor()``.

``TensorInfo.nbytes`` is the tensor's size *in the file* (what a disk read costs), which for a
quantized tensor is less than its widened size.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as QT

from engine.checkpoint import TensorInfo, drop_pages, raise_problems, tensor_problems
from engine.config import ModelConfig
from engine.gguf.dequant import PLAIN, block_geometry, check_supported, dequantize
from engine.gguf.names import hf_name, permuted_heads, unpermute_rows
from engine.gguf.reader import GGUFModelFiles, RawTensor
from engine.gguf.repack import NATIVE, GGUFTarget, target_for, to_canonical
from engine.quant.ggml import MODULES
from engine.quant.layout import FUSED_LINEARS
from engine.quant.spec import QuantWeight
from kernels.ggml_blocks import BLOCKS

log = logging.getLogger(__name__)
KERNEL_TYPES: dict[QT, str] = {QT[name.upper()]: name for name in BLOCKS}  # the ggml types the kernels decode


def widen_dtype(files: GGUFModelFiles) -> torch.dtype:
    """The model's float dtype: that of its unquantized matrices (most bytes), else float16
    (the precision of the block scales of every quantized format)."""
    counts: dict[torch.dtype, int] = {}
    for t in files.tensors.values():
        if len(t.ne) >= 2 and t.qtype in PLAIN:
            counts[PLAIN[t.qtype]] = counts.get(PLAIN[t.qtype], 0) + t.nbytes
    return max(counts, key=counts.get) if counts else torch.float16


def _check_blocks(t: RawTensor, source: str) -> None:
    check_supported(t.qtype, t.name, source)
    block, size = block_geometry(t.qtype)
    numel = 1
    for n in t.ne:
        numel *= n
    if t.ne[0] % block or t.nbytes != numel // block * size:
        raise ValueError(f"{source}: tensor {t.name!r} ({t.qtype.name}, ne {list(t.ne)}) has {t.nbytes} bytes, "
                         "which does not fit its type; the file is corrupt")


class GGUFCheckpoint:
    """The tensors of a GGUF model by Hugging Face name (same interface as ``engine.checkpoint.Checkpoint``)."""

    def __init__(self, files: GGUFModelFiles, cfg: ModelConfig) -> None:
        self.model_dir = files.path  # what messages and reports name
        self.metadata = files.metadata  # the header's key-value pairs (of the first part)
        self.cfg = cfg
        self._dtype = widen_dtype(files)
        self.raw: dict[str, RawTensor] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for t in files.tensors.values():
            name = hf_name(t.name)
            if name is None:
                continue
            _check_blocks(t, str(files.path))
            self.raw[name] = t
            dtype = PLAIN.get(t.qtype, torch.float32)  # quantized tensors widen exactly to float32
            self.tensors[name] = TensorInfo(name, t.file, dtype, t.shape, t.offset, t.nbytes)
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        types: dict[str, int] = {}
        for t in self.raw.values():
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        log.info("gguf checkpoint: %s tensors, model dtype %s (quantized ones widen to float32 as read)",
                 types, self._dtype)

    # ----- reading -----
    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            if path not in self._maps:
                with open(path, "rb") as f:  # ACCESS_COPY: writable view, never written to the file
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._maps[path]

    def _mapped_bytes(self, t: RawTensor) -> torch.Tensor:
        return torch.frombuffer(self._map(t.file), dtype=torch.uint8, count=t.nbytes, offset=t.offset)

    def _widen(self, t: RawTensor, raw: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        shape = (rows, *t.shape[1:]) if len(t.shape) > 1 else t.shape
        if t.qtype in PLAIN:
            return raw.view(PLAIN[t.qtype]).view(shape)
        return dequantize(raw, t.qtype, torch.empty(shape, dtype=dtype))

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` in the Hugging Face layout: a view of the map (float types) or its blocks widened into
        ``dtype`` (default float32, exact; a compute dtype rounds each value once, as a cast of the float32 would)."""
        t, info = self.raw[name], self.tensors[name]
        w = self._widen(t, self._mapped_bytes(t), t.shape[0], dtype or info.dtype)
        heads = permuted_heads(self.cfg, name)
        return unpermute_rows(w, heads) if heads else w

    def tensor_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of :meth:`tensor` (dim 0), widening only the blocks of those rows
        (all rows for llama's Q/K, whose rows are interleaved per head). For lm_head chunks and tables."""
        t, info = self.raw[name], self.tensors[name]
        assert len(t.shape) == 2 and 0 <= start <= stop <= t.shape[0], (name, start, stop)
        if permuted_heads(self.cfg, name):
            return self.tensor(name, dtype)[start:stop]
        row = t.nbytes // t.shape[0]
        raw = self._mapped_bytes(t)[start * row:stop * row]
        return self._widen(t, raw, stop - start, dtype or info.dtype)

    def widens(self, name: str) -> bool:
        """Whether :meth:`tensor` widens ``name`` from blocks into a new tensor (a float type is a view of the map)."""
        return self.raw[name].qtype not in PLAIN

    def layer_forms(self) -> dict[str, GGUFTarget] | None:
        """Fused projection (``self_attn.qkv_proj``, ...) -> the packed form that holds its modules'
        types in every layer exactly (``engine.gguf.repack.target_for``; one form per projection, as
        every layer shares one layout). None when a layer weight has a float type (layers widened)."""
        types: dict[str, set] = {}
        for n, t in self.raw.items():
            if _is_layer_linear(n):
                types.setdefault(FUSED_OF[n.split(".", 3)[3].removesuffix(".weight")], set()).add(t.qtype)
        forms = {fused: target_for(qtypes) for fused, qtypes in types.items()}
        return forms if forms and None not in forms.values() else None

    def native_head(self) -> str | None:
        """The ggml type of an untied output tensor the kernels decode natively (it is then held as
        its blocks, like the layers); None for a tied one (the embedding is a widened row gather)."""
        t = self.raw.get("lm_head.weight")
        return KERNEL_TYPES.get(t.qtype) if t is not None else None

    def block_span(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute offset, bytes) of tensor ``name``'s stored blocks."""
        t = self.raw[name]
        return t.file, t.offset, t.nbytes

    def native_signatures(self) -> tuple[tuple[str, ...], ...] | None:
        """Each layer's ggml type per module (``engine.quant.ggml.MODULES`` order) when every layer
        linear is a type the kernels decode natively (:data:`KERNEL_TYPES`: the K-quants and Q8_0 /
        Q4_0 / Q4_1 / Q5_0 / Q5_1, in any mix); None otherwise (repacked or widened)."""
        out = []
        for i in range(self.cfg.num_hidden_layers):
            types = [self.raw[f"model.layers.{i}.{m}.weight"].qtype for m in MODULES]
            if any(t not in KERNEL_TYPES for t in types):
                return None
            out.append(tuple(KERNEL_TYPES[t] for t in types))
        return tuple(out)

    def module_blocks(self, module: str) -> torch.Tensor:
        """Module ``module``'s (``model.layers.{i}.mlp.up_proj``) blocks as uint8 ``[rows, row bytes]`` in
        the Hugging Face row order: a view of the map, or (llama's Q/K) its rows reordered."""
        t = self.raw[f"{module}.weight"]
        raw = self._mapped_bytes(t).view(t.shape[0], -1)
        heads = permuted_heads(self.cfg, f"{module}.weight")
        return unpermute_rows(raw, heads) if heads else raw

    def plan_note(self, quant_label: str | None, head_blocks: bool = False) -> str:
        """The plan note saying how the GGUF tensors are held (``quant_label``: the layers' packed forms,
        None when they are widened; ``head_blocks``: the output tensor is held as its blocks) and why
        the embedding (and output) tensors are widened."""
        embd = f"token_embd {self.raw['model.embed_tokens.weight'].qtype.name}"
        layers = f"layers packed as {quant_label}" if quant_label else \
            "layers widened (float types have no packed form)"
        if head_blocks:
            return (f"GGUF: {layers}; output {self.raw['lm_head.weight'].qtype.name} held as its blocks too "
                    f"(resident or streamed in row chunks); {embd} widened to the compute dtype (a row gather)")
        kinds = embd + (f", output {self.raw['lm_head.weight'].qtype.name}" if "lm_head.weight" in self.raw
                        else " (tied output)")
        return (f"GGUF: {layers}; {kinds} widened to the compute dtype (the embedding is a row gather and "
                "lm_head runs as dense rows, resident or streamed in row chunks)")

    def packed_linear(self, module: str, target: GGUFTarget) -> QuantWeight:
        """Module ``module``'s (``model.layers.{i}.mlp.up_proj``) weight repacked into ``target``'s
        canonical form from its mapped blocks, rows in the Hugging Face order (llama's Q/K unpermuted)."""
        t = self.raw[f"{module}.weight"]
        assert t.qtype in NATIVE, (module, t.qtype)
        qw = to_canonical(self._mapped_bytes(t), t.qtype, t.shape[0], target)
        heads = permuted_heads(self.cfg, f"{module}.weight")
        if not heads:
            return qw
        rows = {k: unpermute_rows(v, heads).contiguous() for k, v in qw.tensors().items()}
        return QuantWeight(rows["qweight"], rows["scales"], None, None, qw.spec, qw.in_features, rows.get("mins"))

    def raw_span(self, name: str) -> None:
        """None: GGUF tensors have no byte span in the compute layout; use :meth:`tensor`."""
        assert name in self.tensors, name
        return None

    def release(self, name: str) -> None:
        """Drop the mapped pages of ``name`` (after it was copied elsewhere), so RSS stays low."""
        t = self.raw[name]
        drop_pages(self._maps.get(t.file), t.offset, t.nbytes)

    def read_into(self, name: str, out: torch.Tensor, start: int = 0, chunk: int = 16 << 20,
                  drop_cache: bool = True) -> None:
        """Write ``out.numel()`` bytes of the widened tensor ``name`` (from its byte ``start``) into ``out``.

        Reads only the file bytes of the rows covering that range (``pread``, in ``chunk`` requests,
        dropped from the page cache afterwards with ``drop_cache``); safe from several threads.
        """
        t, info, total = self.raw[name], self.tensors[name], out.numel()
        assert out.dtype == torch.uint8 and out.is_contiguous()
        rows = t.shape[0] if len(t.shape) > 1 else 1
        row_out = info.dtype.itemsize * t.ne[0]  # widened bytes per row (a 1-D tensor is one row)
        assert 0 <= start and start + total <= rows * row_out, (name, start, total)
        heads = permuted_heads(self.cfg, name)
        r0, r1 = (0, rows) if heads else (start // row_out, -(-(start + total) // row_out))
        row_file = t.nbytes // rows
        raw = torch.empty(row_file * (r1 - r0), dtype=torch.uint8)
        self._pread(t, raw, r0 * row_file, chunk, drop_cache)
        w = self._widen(t, raw, r1 - r0, info.dtype)
        if heads:
            w = unpermute_rows(w, heads)
        flat = w.contiguous().view(-1).view(torch.uint8)
        out.copy_(flat[start - r0 * row_out:start - r0 * row_out + total])

    def _pread(self, t: RawTensor, out: torch.Tensor, start: int, chunk: int, drop_cache: bool) -> None:
        view, total = memoryview(out.numpy()), out.numel()
        fd, base = self._fd(t.file), t.offset + start
        for pos in range(0, total, chunk):
            n = min(chunk, total - pos)
            if os.preadv(fd, [view[pos:pos + n]], base + pos) != n:
                raise ValueError(f"{t.file} is truncated: short read of {t.name!r}; re-download it")
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, base, total, os.POSIX_FADV_DONTNEED)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    # ----- checks and properties -----
    def validate(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Check the tensors found equal ``expected`` (names and shapes)."""
        raise_problems(tensor_problems(self.tensors, expected, "the metadata"),
                       f"GGUF file {self.model_dir} does not match its metadata")

    @property
    def dtype(self) -> torch.dtype:
        """The model's float dtype (see :func:`widen_dtype`); the compute dtype on GPU by default."""
        return self._dtype

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # views still alive; the OS unmaps when they are gone
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


FUSED_OF = {part: fused for fused, parts in FUSED_LINEARS.items() for part in parts}


def _is_layer_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")
