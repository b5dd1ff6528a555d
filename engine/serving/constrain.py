"""Sampling held to a format (JSON mode: engine.serving.json_mode; a forced tool call): which tokens a sequence
may take next. A format is a list of segments (one of some texts, a JSON object, a schema's nodes:
engine.serving.schema), read character by character across token boundaries.

The row is sampled as usual first; the token is kept when its text continues the format (nearly always, for
a model asked for JSON). Otherwise the draw is repeated among the tokens the format allows, taken in order of
logit: the first TOP of them, then, if none of those is allowed, the tokens whose first character the format
takes next (a first-character table per tokenizer, built once), most likely first. Greedy
rows take the most likely allowed token; others draw among the allowed ones with the row's own temperature,
top-k, top-p and min-p applied to them (engine.sampling.warp_logits, in Hugging Face's order). Special tokens
other than end of sequence are never allowed (their text is dropped from replies); end of sequence only once
the object is closed, and then nothing else.
"""

from __future__ import annotations

import json
import logging
import weakref

import torch

from engine.sampling import SamplingParams, warp_logits
from engine.token_bytes import split_utf8, token_bytes
from engine.serving import json_mode
from engine.serving.schema import Text, compiled

log = logging.getLogger(__name__)
TOP = 256  # candidates tried before the rest of the vocabulary
_BLOCK = 256  # then tokens whose first character fits, tried this many at a time
_firsts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {vocab: _first_chars' answer}


def token_text(tokenizer, token: int) -> str:
    """A token's text as a reply shows it mid-stream ("" for special tokens; U+FFFD for part of a character)."""
    return token_bytes(tokenizer, token).decode("utf-8", "replace")


class JsonValue:
    """A format segment: one JSON object (engine.serving.json_mode)."""
    start = json_mode.START

    @staticmethod
    def step(state, ch: str):
        return json_mode.step(state, ch)

    @staticmethod
    def complete(state) -> bool:
        return json_mode.done(state)


class Format:
    """What a sequence's reply must be, as segments in order; its state after the tokens taken so far. Tokens are
    read as the bytes they add to the reply (engine.token_bytes: a SentencePiece piece's leading space included), a
    character split over tokens once its last byte is in (``pending`` holds the bytes before)."""

    def __init__(self, tokenizer, segments: list, literals: str = "") -> None:
        """``literals``: text holding the format's fixed strings (the schema, the tool names), whose characters a
        token ending inside a character may be the start of."""
        self.tokenizer, self.segments = tokenizer, segments
        self.state, self.pending = (0, segments[0].start), b""
        self.wide = sorted({c for c in literals if ord(c) > 127})

    def _step(self, state: tuple, ch: str) -> tuple | None:
        i, sub = state
        while i < len(self.segments):
            seg = self.segments[i]
            nxt = seg.step(sub, ch)
            if nxt is not None:
                return i, nxt
            if not seg.complete(sub):
                return None
            i += 1  # the segment is whole: ``ch`` starts the next one
            sub = self.segments[i].start if i < len(self.segments) else None
        return None

    def _feed(self, data: bytes) -> tuple[tuple, bytes] | None:
        """(state, pending bytes) after ``data``, or None where the format does not take it."""
        split = split_utf8(self.pending + data)
        if split is None:
            return None
        text, rest = split
        state = self.state
        for ch in text:
            state = self._step(state, ch)
            if state is None:
                return None
        if rest and not any(self._step(state, ch) is not None for ch in self._completions(rest)):
            return None  # no character the format takes next starts with these bytes: a dead end
        return state, rest

    def _completions(self, rest: bytes) -> list[str]:
        """Characters that begin with the bytes ``rest``: the lowest one, and those of the format's literals."""
        lead = rest[0]
        size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        second = {0xE0: 0xA0, 0xF0: 0x90}.get(lead, 0x80)
        low = (rest + bytes([second] if len(rest) == 1 else []) + b"\x80" * size)[:size]
        out = [c for c in low.decode("utf-8", "ignore")[:1]]
        return out + [c for c in self.wide if c.encode("utf-8").startswith(rest)]

    @property
    def closed(self) -> bool:
        i, sub = self.state
        return not self.pending and i == len(self.segments) - 1 and self.segments[i].complete(sub)

    def allows(self, token: int, eos_ids: set[int]) -> bool:
        if token in eos_ids:
            return self.closed
        data = token_bytes(self.tokenizer, token)
        return bool(data) and self._feed(data) is not None

    def advance(self, token: int, eos_ids: set[int]) -> None:
        """Take ``token``. One the format does not allow (only when no token is, and the model has no end of
        sequence to stop with) leaves the state as it was rather than failing the engine's step."""
        if token not in eos_ids:
            fed = self._feed(token_bytes(self.tokenizer, token))
            if fed is None:
                log.warning("token %d leaves the reply's format (no allowed token was left)", token)
                return
            self.state, self.pending = fed


def reply_format(params, tokenizer) -> Format | None:
    """The format ``params`` hold a reply to: one JSON object (``json_object``), or one call of a tool named in
    ``tool_call`` (a forced ``tool_choice``: :func:`call_format`), else None."""
    if params.tool_call:
        return Format(tokenizer, call_format(params.tool_call), "".join(params.tool_call))
    if params.json_schema:
        schema = params.json_schema  # its literals with any \u escapes as the characters they are
        return Format(tokenizer, [compiled(schema)], json.dumps(json.loads(schema), ensure_ascii=False))
    return Format(tokenizer, [JsonValue()]) if params.json_object else None


def call_format(names: tuple[str, ...]) -> list:
    """One ``<tool_call>`` block calling one of ``names``, as engine.serving.tools parses it."""
    return [Text(['<tool_call>\n{"name": "']), Text(list(names)), Text(['", "arguments": ']), JsonValue(),
            Text(["}\n</tool_call>"])]


def constrained_token(row: torch.Tensor, drawn: int, constraint: Format, eos_ids: set[int],
                      params: SamplingParams, generator: torch.Generator | None) -> int:
    """The token to take from ``row`` [V] (logits after penalties) given the unconstrained ``drawn``: it, when
    the format allows it, else a draw among the allowed ones with ``params``' temperature and filters (end of
    sequence if none is allowed: a vocabulary without the characters of JSON ends the reply there)."""
    if constraint.allows(drawn, eos_ids):
        return drawn
    if constraint.closed and eos_ids:
        return min(eos_ids)
    top = torch.topk(row.float(), min(TOP, row.numel())).indices.tolist()
    allowed = [t for t in top if constraint.allows(t, eos_ids)]
    if not allowed:  # only the tokens whose first character the format allows, most likely first
        allowed = _allowed_beyond(row, constraint, eos_ids)
    if not allowed:
        return min(eos_ids) if eos_ids else drawn
    if params.greedy or len(allowed) == 1:
        return allowed[0]
    ids = torch.tensor(allowed, device=row.device)
    probs = torch.softmax(warp_logits(row[ids].float()[None], params), dim=-1)[0]
    return allowed[int(torch.multinomial(probs, 1, generator=generator))]


def _first_chars(tokenizer, vocab: int) -> tuple[torch.Tensor, dict[str, int]]:
    """Each token's first character as a code (-1: no text) [vocab], and the characters that occur; cached."""
    cache = _firsts.setdefault(tokenizer, {})
    if vocab not in cache:
        firsts = [token_text(tokenizer, t)[:1] for t in range(vocab)]
        chars = {c: ord(c) for c in set(firsts) if c}
        cache[vocab] = (torch.tensor([ord(c) if c else -1 for c in firsts]), chars)
    return cache[vocab]


def _allowed_beyond(row: torch.Tensor, constraint: Format, eos_ids: set[int]) -> list[int]:
    """Allowed tokens found past the top ones: among those starting with a character the format takes next."""
    codes, chars = _first_chars(constraint.tokenizer, row.numel())
    # U+FFFD: a token starting inside a character (or completing the pending one): allows() decides
    ok = [code for c, code in chars.items() if c == "\ufffd" or constraint._feed(c.encode("utf-8")) is not None]
    fits = torch.isin(codes, torch.tensor(ok, dtype=codes.dtype)).to(row.device)
    order = torch.argsort(row.float().masked_fill(~fits, float("-inf")), descending=True)[: int(fits.sum())].tolist()
    for lo in range(0, len(order), _BLOCK):
        allowed = [t for t in order[lo:lo + _BLOCK] if constraint.allows(t, eos_ids)]
        if allowed:
            return allowed
    return []
