"""Finding and opening GGUF files: one file, a directory holding one, or a split set.

The ``gguf`` package's ``GGUFReader`` parses the header (metadata and tensor table) and maps
the file read-only with numpy; nothing of the tensor data is read here. Every way a file can
be unusable (not a GGUF, truncated, a split part missing) becomes a ``ValueError`` or
``FileNotFoundError`` that names the file and says what to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFReader

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


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


def is_gguf_path(path: str | Path) -> bool:
    """True for a ``.gguf`` file, or a directory with a ``.gguf`` file and no ``config.json``."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        return True
    return p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))


def find_parts(path: str | Path) -> list[Path]:
    """The file(s) of the model at ``path``: one GGUF, or every part of a split set given its first part."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.glob("*.gguf") if not (m := SPLIT_RE.match(f.name)) or int(m["no"]) == 1)
        if not files:
            raise FileNotFoundError(f"--model {p}: no .gguf file in this directory")
        if len(files) > 1:
            raise ValueError(f"--model {p}: this directory holds several GGUF models "
                             f"({', '.join(f.name for f in files[:6])}); pass the file itself")
        p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"--model {p}: no such file")
    m = SPLIT_RE.match(p.name)
    if m is None:
        return [p]
    no, count = int(m["no"]), int(m["count"])
    if no != 1:
        raise ValueError(f"--model {p} is part {no} of a split GGUF: pass the first part "
                         f"({m['stem']}-00001-of-{m['count']}.gguf)")
    parts = [p.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [q.name for q in parts if not q.is_file()]
    if missing:
        raise FileNotFoundError(f"split GGUF {p.name}: part(s) {', '.join(missing)} missing from {p.parent}; "
                                "download every part of the set into the same directory")
    return parts


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); "
                         "pass a .gguf file from llama.cpp / the Hugging Face Hub, or a model directory")


def open_reader(path: Path) -> GGUFReader:
    """Parse one file's header; truncated or corrupt files give a ValueError naming the file."""
    _check_magic(path)
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); re-download it") from e


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """The key/value metadata as Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"GGUF metadata key {key!r} is corrupt ({e}); re-download the file") from e
    return out


def raw_tensors(reader: GGUFReader, path: Path) -> list[RawTensor]:
    """The tensor table of one file, each byte range checked against the file size."""
    size = path.stat().st_size
    out = []
    for t in reader.tensors:
        ne = tuple(int(x) for x in t.shape)
        offset, nbytes = int(t.data_offset), int(t.n_bytes)
        if offset + nbytes > size:
            raise ValueError(f"{path} is truncated: tensor {t.name!r} ends at byte {offset + nbytes} but the file "
                             f"has {size} bytes; re-download it")
        out.append(RawTensor(t.name, GGMLQuantizationType(int(t.tensor_type)), ne, path, offset, nbytes))
    return out


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
        reader = open_reader(part)
        if i == 0:
            metadata = read_metadata(reader)
        for t in raw_tensors(reader, part):
            if t.name in tensors:
                raise ValueError(f"tensor {t.name!r} appears in two parts ({tensors[t.name].file.name}, {part.name})")
            tensors[t.name] = t
        del reader  # its numpy map closes with it; the checkpoint maps the files itself
    expected = metadata.get("split.tensors.count")
    if expected is not None and int(expected) != len(tensors):
        raise ValueError(f"split GGUF {parts[0].name}: the parts hold {len(tensors)} tensors, the first part says "
                         f"{expected}; a part is from another download: re-download the set")
    log.info("gguf: %s (%d part(s), %d tensors)", parts[0], len(parts), len(tensors))
    return GGUFModelFiles(parts, metadata, tensors)
