"""Hugging Face safetensors checkpoints, memory-mapped and validated.

Headers are parsed here (8-byte little-endian length, JSON) so that tensor sizes are
known without touching any weight bytes (the planner needs only this), and tensors are
returned as zero-copy views of a private (copy-on-write) memory map: nothing is read
until it is used, and nothing is ever written back to the user's model directory.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, byte range (absolute), dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors header and check every byte range lies inside the file."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is missing: re-download the model (the index names it)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path} has a corrupt safetensors header (length {n}); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header ({e}); re-download it") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it")
    infos = {name: _entry(path, name, meta, 8 + n, size) for name, meta in header.items() if name != "__metadata__"}
    _check_no_overlap(path, infos)
    return infos


def _entry(path: Path, name: str, meta, base: int, size: int) -> TensorInfo:
    """One tensor's header entry (``base``: where the data starts), checked against its dtype and the file."""
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
        raise ValueError(f"{path}: bad header entry for {name!r} (it needs dtype, shape and data_offsets); "
                         "re-download the file")
    dtype = SAFETENSORS_DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']!r}, which this engine does not read "
                         f"({', '.join(SAFETENSORS_DTYPES)}); use a bf16 / fp16 / fp32 checkpoint")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
        raise ValueError(f"{path}: bad header entry for {name!r} (shape {shape!r}, data_offsets {offsets!r}); "
                         "re-download the file")
    start, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if end - start != numel * dtype.itemsize or start < 0:
        raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets; the file is corrupt")
    if base + end > size:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {base + end} but the file has "
                         f"{size} bytes; re-download it")
    return TensorInfo(name, path, dtype, tuple(shape), base + start, end - start)


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    """ValueError when two tensors' byte ranges overlap (a corrupt offset would read one's bytes as the
    other's; the safetensors library refuses such files too)."""
    end, last = 0, None
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        if info.offset < end:
            raise ValueError(f"{path}: tensors {last!r} and {info.name!r} overlap in the file; the file is corrupt, "
                             "re-download it")
        end, last = info.offset + info.nbytes, info.name


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, via the index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is corrupt ({e}); re-download the model") from e
        return sorted({model_dir / f for f in weight_map.values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = (f" (found {pickles[:3]}: pickled weights are never loaded; convert them to safetensors)"
                if pickles else "")
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}{hint}")
    return files


class Checkpoint:
    """All tensors of a model directory, by Hugging Face name, memory-mapped on demand."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for f in shard_files(self.model_dir):
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} appears in two shards ({self.tensors[name].file.name}, {f.name})")
                self.tensors[name] = info
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:  # ACCESS_COPY: writable view, never written to the file
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy CPU view of tensor ``name`` in the mapped file."""
        info = self.tensors[name]
        raw = torch.frombuffer(self._map(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return raw.view(info.dtype).view(info.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of ``name`` (after it was copied elsewhere), so RSS stays low.

        The mapping is private, so the pages are simply discarded; a later access reads
        the file again.
        """
        info = self.tensors[name]
        drop_pages(self._maps.get(info.file), info.offset, info.nbytes)

    def raw_span(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute byte offset, bytes) of tensor ``name``: its bytes as stored, row-major in
        ``tensors[name].dtype``, so a reader may copy them straight out of the file."""
        info = self.tensors[name]
        return info.file, info.offset, info.nbytes

    def validate(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Check the tensors found equal ``expected`` (names and shapes) and use float dtypes."""
        problems = tensor_problems(self.tensors, expected, "config.json")
        problems += [f"{n} has dtype {self.tensors[n].dtype}; only bf16/fp16/fp32 weights are supported"
                     for n in sorted(set(expected) & set(self.tensors))
                     if self.tensors[n].shape == tuple(expected[n])
                     and self.tensors[n].dtype not in (torch.bfloat16, torch.float16, torch.float32)]
        raise_problems(problems, f"checkpoint {self.model_dir} does not match its config.json")

    @property
    def dtype(self) -> torch.dtype:
        """The most common float dtype among the weights (packed integer tensors of quantized checkpoints
        are not counted)."""
        counts: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
        return max(counts, key=counts.get)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # views still alive; the OS unmaps when they are gone
                pass
        self._maps.clear()


def drop_pages(m: mmap.mmap | None, offset: int, nbytes: int) -> None:
    """Discard the pages of a private map covering bytes [offset, offset + nbytes) (a later access
    reads the file again); nothing where the map is absent or the platform has no madvise."""
    if m is None or not hasattr(m, "madvise"):
        return
    page = mmap.PAGESIZE
    start = offset // page * page
    end = min(len(m), -(-(offset + nbytes) // page) * page)
    m.madvise(mmap.MADV_DONTNEED, start, end - start)


def tensor_problems(found: dict, expected: dict[str, tuple[int, ...]], source: str) -> list[str]:
    """Missing and unexpected tensor names, and shapes that differ from what ``source`` implies."""
    have, want = set(found), set(expected)
    problems = []
    if want - have:
        problems.append(f"missing tensors: {_short(want - have)}")
    if have - want:
        problems.append(f"unexpected tensors: {_short(have - want)}")
    return problems + [f"{n} has shape {list(found[n].shape)}, {source} implies {list(expected[n])}"
                       for n in sorted(want & have) if tuple(found[n].shape) != tuple(expected[n])]


def check_layer_count(names, num_hidden_layers: int, what: str, key: str = "num_hidden_layers") -> None:
    """ValueError (under ``what``) when the ``model.layers.{i}.`` tensors among ``names`` are not layers
    0 .. ``num_hidden_layers`` - 1: said before anything is built per layer (a corrupt count such as
    2**40 would otherwise be looped over)."""
    index = (n.removeprefix("model.layers.").split(".", 1)[0] for n in names if n.startswith("model.layers."))
    found = {int(i) for i in index if i.isdigit()}
    if len(found) != num_hidden_layers or (found and (min(found), max(found)) != (0, num_hidden_layers - 1)):
        held = f"layers {min(found)}-{max(found)} ({len(found)} of them)" if found else "no decoder layer"
        raise ValueError(f"{what}: {key} is {num_hidden_layers}, but the weights hold {held}")


def raise_problems(problems: list[str], what: str) -> None:
    """One ValueError listing up to 12 problems under ``what``; nothing when there are none."""
    if problems:
        more = "\n  (more problems omitted)" if len(problems) > 12 else ""
        raise ValueError(f"{what}:\n  - " + "\n  - ".join(problems[:12]) + more)


def _short(names: set[str]) -> str:
    items = sorted(names)
    return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
