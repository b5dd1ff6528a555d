"""Streaming detokenization (never emits broken UTF-8) and stop-string matching."""

from __future__ import annotations

import logging
from typing import Protocol

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
# Tokens of context decoded before the first new token (as vLLM), so leading-space rules match.
_INITIAL_CONTEXT = 5


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns token ids pushed one at a time into printable text.

    Uses the prefix/read offset technique (TGI, vLLM): the window ``tokens[prefix:]`` and
    ``tokens[prefix:read]`` are decoded and only their difference is emitted, and only when it
    does not end in U+FFFD (an incomplete multi-byte character). Concatenating all ``push`` results
    and ``flush()`` gives ``tokenizer.decode(ids)`` (or, with ``context_ids``, the text that
    ``ids`` add after the context).
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = False,
                 context_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._tokens: list[int] = list(context_ids or [])
        self._read = len(self._tokens)
        self._prefix = max(self._read - _INITIAL_CONTEXT, 0)

    @property
    def token_ids(self) -> list[int]:
        """All ids seen (context included)."""
        return list(self._tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _window_diff(self) -> tuple[str, str]:
        prefix_text = self._decode(self._tokens[self._prefix:self._read])
        new_text = self._decode(self._tokens[self._prefix:])
        return prefix_text, new_text

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became printable (possibly "")."""
        self._tokens.append(int(token_id))
        prefix_text, new_text = self._window_diff()
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            if not new_text.startswith(prefix_text):
                logger.debug("detokenizer window changed earlier text: %r -> %r", prefix_text, new_text)
            self._prefix, self._read = self._read, len(self._tokens)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a trailing incomplete character as U+FFFD)."""
        if self._read == len(self._tokens):
            return ""
        prefix_text, new_text = self._window_diff()
        self._prefix, self._read = self._read, len(self._tokens)
        if not new_text.startswith(prefix_text):
            # the held-back tokens are an incomplete character's bytes, and the decoder turned the window's whole byte
            # run into U+FFFD, earlier complete characters included (SentencePiece byte fallback): one U+FFFD for the
            # incomplete character, not one for each byte of the run past the text already given ("日" cut after one
            # byte of "本" gave "日���")
            return _REPLACEMENT
        return new_text[len(prefix_text):]


class StopStringMatcher:
    """Holds back text that may begin a stop string; cuts the stream at the first stop string.

    ``push(text)`` returns ``(safe_text, stopped)``. A stop string itself is never returned and all
    text after it is dropped. Call ``flush()`` at the end of generation to get the held-back tail.
    """

    def __init__(self, stops: list[str]) -> None:
        bad = [s for s in stops if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}; remove the empty ones")
        self.stops = list(dict.fromkeys(stops))
        self._buffer = ""
        self.stopped = False

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def push(self, text: str) -> tuple[str, bool]:
        """Feed newly decoded text; return (text safe to print, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._buffer + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._buffer = ""
            return buf[:min(hits)], True
        held = self._held_suffix_len(buf)
        self._buffer = buf[len(buf) - held:] if held else ""
        return buf[:len(buf) - held], False

    def flush(self) -> str:
        """Return the held-back text (it did not turn into a stop string); "" after a stop."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out
