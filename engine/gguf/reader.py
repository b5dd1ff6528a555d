"""Finding and opening GGUF files: one file, a directory holding one, or a split set.

Only the headers are parsed (``engine.gguf.header``); nothing of the tensor data is read here.
Every way a file can be unusable (not a GGUF, truncated, a split part missing) becomes a
``ValueError`` or ``FileNotFoundError`` that names the file and says what to do.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.gguf.header import DEFAULT_ALIGNMENT, MAGIC, HeaderError, parse_header
from engine.gguf.paths import find_parts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawTensor:
    """One tensor as the file stores it: ggml type, ggml shape (ne0 first), file and byte range."""

    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous (row) dimension
    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The row-major (torch / Hugging Face) shape: ggml's ne reversed."""
        return tuple(reversed(self.ne))


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); "
                         "pass a .gguf file from llama.cpp / the Hugging Face Hub, or a model directory")


def _tensor(path: Path, size: int, name: str, ne: tuple[int, ...], type_id: int, offset: int) -> RawTensor:
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has ggml type id {type_id}, unknown to this engine; "
                         "use a GGUF quantized to a common type (e.g. Q4_K_M or Q8_0)") from None
    numel = 1
    for n in ne:
        numel *= n
    nbytes = numel // block * type_size
    if offset + nbytes > size:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {offset + nbytes} but the file "
                         f"has {size} bytes; re-download it")
    return RawTensor(name, qtype, ne, path, offset, nbytes)


def read_part(path: Path) -> tuple[dict[str, Any], list[RawTensor]]:
    """Metadata and tensor table of one file; bad, truncated or corrupt files give a ValueError naming it."""
    _check_magic(path)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            meta, entries, start = parse_header(view)
        except HeaderError as e:
            raise ValueError(f"{path} is truncated or corrupt ({e}); re-download it") from e
        finally:
            view.release()
    tensors = [_tensor(path, size, *e) for e in entries]
    _check_layout(path, tensors, start, meta.get("general.alignment", DEFAULT_ALIGNMENT))
    return meta, tensors


def _check_layout(path: Path, tensors: list[RawTensor], start: int, align: int) -> None:
    """Each tensor's data starts where the one before it ends, padded to ``align``, as ggml's reader
    requires (a corrupt offset or type would otherwise read another tensor's bytes as weights)."""
    expected = start
    for t in tensors:
        if t.offset != expected:
            raise ValueError(f"{path} is corrupt: tensor {t.name!r} starts at byte {t.offset}, but the tensor "
                             f"table puts it at {expected} (ggml's layout); re-download it")
        expected += -(-t.nbytes // align) * align


@dataclass
class GGUFModelFiles:
    """The parsed headers of a GGUF model: metadata (of the first part) and every part's tensors."""

    parts: list[Path]
    metadata: dict[str, Any]
    tensors: dict[str, RawTensor]

    @property
    def path(self) -> Path:
        return self.parts[0]


def open_gguf_files(path: str | Path) -> GGUFModelFiles:
    """Find the part(s) at ``path`` and parse their headers (no tensor data is read)."""
    parts = find_parts(path)
    metadata: dict[str, Any] = {}
    tensors: dict[str, RawTensor] = {}
    for i, part in enumerate(parts):
        meta, part_tensors = read_part(part)
        if i == 0:
            metadata = meta
        for t in part_tensors:
            if t.name in tensors:
                raise ValueError(f"tensor {t.name!r} appears in two parts ({tensors[t.name].file.name}, {part.name})")
            tensors[t.name] = t
    expected = metadata.get("split.tensors.count")
    if expected is not None and int(expected) != len(tensors):
        raise ValueError(f"split GGUF {parts[0].name}: the parts hold {len(tensors)} tensors, the first part says "
                         f"{expected}; a part is from another download: re-download the set")
    log.info("gguf: %s (%d part(s), %d tensors)", parts[0], len(parts), len(tensors))
    return GGUFModelFiles(parts, metadata, tensors)
