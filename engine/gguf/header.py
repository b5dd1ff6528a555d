"""Parsing a GGUF header: metadata key/values and the tensor table.

Layout (GGUF v2/v3, little-endian): ``"GGUF"``, version u32, tensor count u64, key/value count
u64; each key/value is a string key, a u32 value type and the value (arrays: element type u32,
count u64, elements); each tensor entry is a string name, u32 dims, u64 per dim (ggml order),
u32 ggml type and a u64 offset from the data section, which starts at the next multiple of
``general.alignment`` (default 32) after the table. Strings are a u64 length and UTF-8 bytes.

The ``gguf`` package's ``GGUFReader`` reads the same, but builds a numpy object per array
element (seconds for a 150k-token vocabulary); this parser reads numeric arrays with one
``numpy.frombuffer`` and strings with a tight loop. Any read past the end of the file raises
:class:`HeaderError`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value type id -> (struct format, numpy dtype) for scalars; 8 = string, 9 = array
SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
           4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
           10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
STRING, ARRAY = 8, 9


class HeaderError(ValueError):
    """The header is cut short or malformed."""


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise HeaderError(f"header ends early (needs byte {self.pos + n}, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")  # llama.cpp tolerates broken tokens too


def _value(c: _Cursor, vtype: int) -> Any:
    if vtype in SCALARS:
        return c.unpack(SCALARS[vtype][0])
    if vtype == STRING:
        return c.string()
    if vtype == ARRAY:
        etype, count = c.unpack("<I"), c.unpack("<Q")
        if etype in SCALARS:
            dtype = np.dtype(SCALARS[etype][1]).newbyteorder("<")
            return np.frombuffer(c.take(count * dtype.itemsize), dtype=dtype).tolist()
        if etype in (STRING, ARRAY):
            return [_value(c, etype) for _ in range(count)]
        raise HeaderError(f"unknown array element type {etype}")
    raise HeaderError(f"unknown value type {vtype}")


def parse_header(buf: memoryview) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, tensors as (name, ggml ne, ggml type id, absolute offset), data start) of a GGUF file."""
    c = _Cursor(buf)
    if bytes(c.take(4)) != MAGIC:
        raise HeaderError("bad magic")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = _value(c, c.unpack("<I"))
    entries = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("<I")
        if n_dims > 8:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
        ne = tuple(c.unpack("<Q") for _ in range(n_dims))
        entries.append((name, ne, c.unpack("<I"), c.unpack("<Q")))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise HeaderError(f"general.alignment {align!r} is not a power of two")
    start = -(-c.pos // align) * align
    return meta, [(n, ne, t, start + off) for n, ne, t, off in entries], start
