"""Byte sizes as people type them ("6GB", "512 MiB") and as the engine prints them.

Decimal units (KB, MB, GB, TB and the bare K, M, G, T) are powers of 1000, binary units
(KiB, MiB, GiB, TiB) are powers of 1024. Output is always binary ("6.00 GiB"), which is
what GPU tools and the CUDA allocator report.
"""

from __future__ import annotations

import math
import re

_DECIMAL = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
            "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS = {**_DECIMAL, **_BINARY}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)$")
_FORMS = ('a number of bytes ("1073741824") or a number with a unit: B, KB/MB/GB/TB '
          '(powers of 1000; bare K/M/G/T mean the same), KiB/MiB/GiB/TiB (powers of 1024); '
          'e.g. "6GB", "6 GiB", "512MiB", "0.5TB"')


def parse_size(text: str) -> int:
    """Parse a byte size such as ``"6GB"``, ``"6 GiB"``, ``"0.5TB"`` or ``"1073741824"``.

    Units are case-insensitive: GB = 10**9 and GiB = 2**30 bytes; a bare ``G``/``M``/``K``/``T``
    is decimal like GB/MB/KB/TB (so ``"6G"`` == ``"6GB"``). A plain number is bytes and
    must be whole. Fractions with a unit are rounded to the nearest byte.

    Raises ValueError, naming the text and the accepted forms, for empty text, negative,
    non-numeric (``"abc"``, ``"nan"``) or unknown-unit (``"6XB"``) input.
    """
    if not isinstance(text, str):
        raise ValueError(f"size must be a string, got {type(text).__name__} {text!r}; expected {_FORMS}")
    s = text.strip().lower()
    if not s:
        raise ValueError(f"empty size: expected {_FORMS}")
    if s.startswith("-"):
        raise ValueError(f"size {text!r} is negative: sizes must be >= 0; expected {_FORMS}")
    m = _SIZE_RE.match(s)
    if m is None:
        raise ValueError(f"cannot parse size {text!r}: expected {_FORMS}")
    number, unit = m.groups()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in size {text!r}: expected {_FORMS}")
    if unit in ("", "b") and "." in number:
        raise ValueError(f"size {text!r} is a fractional number of bytes: give whole bytes or a unit ({_FORMS})")
    value = float(number) * _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"size {text!r} is too large: expected {_FORMS}")
    return int(number) if unit in ("", "b") else round(value)


def format_size(n: int) -> str:
    """Render ``n`` bytes in binary units with two decimals: ``"6.00 GiB"``, ``"444.52 MiB"``, ``"512 B"``."""
    n = int(n)
    sign, a = ("-", -n) if n < 0 else ("", n)
    if a < 1024:
        return f"{sign}{a} B"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if a >= scale:
            return f"{sign}{a / scale:.2f} {unit}"
    raise AssertionError("unreachable")


def parse_size_arg(text: str, flag: str = "size") -> int:
    """Parse a size typed on a command line, where a unit is required.

    Like :func:`parse_size`, but a bare number other than ``0`` is refused with a hint
    (``"6"`` -> "did you mean 6GB?"): on a command line a plain ``6`` is almost always a
    forgotten unit, not six bytes. Write ``6B`` or ``1073741824B`` for bytes.
    """
    if isinstance(text, str) and text.strip().startswith("-"):
        raise ValueError(f"{flag} {text.strip()!r} is negative: give a positive size such as 6GB")
    m = _SIZE_RE.match(text.strip().lower()) if isinstance(text, str) else None
    if m and m.group(2) == "" and float(m.group(1)) != 0:
        n = m.group(1)
        raise ValueError(f"{flag} {text.strip()!r} has no unit: did you mean {n}GB (or {n}GiB)? For bytes write {n}B")
    return parse_size(text)
