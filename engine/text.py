"""Checks on user text before it reaches the tokenizer (no heavy imports: the CLI's checks use it)."""

from __future__ import annotations


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (which the tokenizer needs), or None when it can.

    Python keeps bytes that are not UTF-8 (in argv, a pipe or a terminal with another encoding) as
    unpaired surrogates, and JSON can spell one (``"\\ud800"``); the tokenizer rejects both.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f", from the byte 0x{code - 0xDC00:02x} that is not UTF-8" if 0xDC80 <= code <= 0xDCFF else ""
        return f"character {e.start} is an unpaired surrogate (U+{code:04X}{byte})"
    return None
