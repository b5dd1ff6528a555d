"""The bytes a token adds to a reply, as the reply's text shows them mid-stream.

Decoding one token alone is not that: a byte-level BPE token holding part of a UTF-8 character decodes to U+FFFD,
and a SentencePiece piece loses its leading "▁" space (the decoder strips it at the start of a text). So a format
checker fed ``decode([token])`` (engine.serving.constrain) saw " and" as "and" and could never spell a character
split over tokens, and logprobs' ``bytes`` could not rebuild the text. Here each token's bytes come from its piece:
the byte-level alphabet reversed (GPT-2 / Qwen / Llama 3), ``<0xNN>`` byte-fallback pieces and "▁" for a space
(SentencePiece: Llama 2, Mistral, Gemma); special tokens add nothing (replies skip them). A tokenizer of another
kind falls back to decoding the token alone.
"""

from __future__ import annotations

import codecs
import re
import weakref

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (kind, specials, {id: bytes})


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed (character -> byte)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_ALPHABET = _byte_level_alphabet()


def _kind(tokenizer) -> tuple[str, set[int]]:
    hf = getattr(tokenizer, "_tok", None)
    if hf is None:
        return "decode", set()
    specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    name = type(hf.decoder).__name__ if hf.decoder is not None else ""
    if name == "ByteLevel":
        return "byte_level", specials
    if hf.token_to_id("<0x00>") is not None or "▁" in repr(hf.decoder):
        return "sentencepiece", specials
    return "decode", specials


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes ``token`` adds to a reply's text (b"" for a special token), cached per tokenizer."""
    entry = _cache.get(tokenizer)
    if entry is None:
        entry = _cache[tokenizer] = (*_kind(tokenizer), {})
    kind, specials, known = entry
    out = known.get(token)
    if out is None:
        out = known[token] = _bytes_of(tokenizer, kind, specials, token)
    return out


def _bytes_of(tokenizer, kind: str, specials: set[int], token: int) -> bytes:
    if token in specials:
        return b""
    piece = tokenizer._tok.id_to_token(token) if kind != "decode" else None
    if piece is None:  # another kind of tokenizer, or an id it does not know
        return tokenizer.decode([token], skip_special_tokens=True).encode("utf-8")
    if kind == "byte_level":
        if all(c in _ALPHABET for c in piece):
            return bytes(_ALPHABET[c] for c in piece)
        return piece.encode("utf-8")  # an added (non-special) token: its text as is
    if m := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def split_utf8(data: bytes, errors: str = "strict") -> tuple[str, bytes] | None:
    """``data`` as its complete characters and the bytes of an unfinished last one; None where it is not UTF-8
    (``errors="replace"``: never None, bad bytes read as U+FFFD)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors)
    try:
        text = dec.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return text, dec.getstate()[0]

