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

import logging
import weakref

import torch

from engine.sampling import SamplingParams, warp_logits
from engine.serving import json_mode
from engine.serving.schema import Text, compiled

log = logging.getLogger(__name__)
TOP = 256  # candidates tried before the rest of the vocabulary
_BLOCK = 256  # then tokens whose first character fits, tried this many at a time
_texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {token id: its text}
_firsts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {vocab: _first_chars' answer}


def token_text(tokenizer, token: int) -> str:
    """A token's text as a reply shows it ("" for special tokens), cached per tokenizer."""
    cache = _texts.setdefault(tokenizer, {})
    text = cache.get(token)
    if text is None:
        text = cache[token] = tokenizer.decode([token], skip_special_tokens=True)
    return text


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
    """What a sequence's reply must be, as segments in order; its state after the tokens taken so far."""

    def __init__(self, tokenizer, segments: list) -> None:
        self.tokenizer, self.segments = tokenizer, segments
        self.state = (0, segments[0].start)

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

    def _feed(self, text: str) -> tuple | None:
        state = self.state
        for ch in text:
            state = self._step(state, ch)
            if state is None:
                return None
        return state

    @property
    def closed(self) -> bool:
        i, sub = self.state
        return i == len(self.segments) - 1 and self.segments[i].complete(sub)

    def allows(self, token: int, eos_ids: set[int]) -> bool:
        if token in eos_ids:
            return self.closed
        text = token_text(self.tokenizer, token)
        return bool(text) and self._feed(text) is not None

    def advance(self, token: int, eos_ids: set[int]) -> None:
        """Take ``token``. One the format does not allow (only when no token is, and the model has no end of
        sequence to stop with) leaves the state as it was rather than failing the engine's step."""
        if token not in eos_ids:
            state = self._feed(token_text(self.tokenizer, token))
            if state is None:
                log.warning("token %d leaves the reply's format (no allowed token was left)", token)
                return
            self.state = state


def reply_format(params, tokenizer) -> Format | None:
    """The format ``params`` hold a reply to: one JSON object (``json_object``), or one call of a tool named in
    ``tool_call`` (a forced ``tool_choice``: :func:`call_format`), else None."""
    if params.tool_call:
        return Format(tokenizer, call_format(params.tool_call))
    if params.json_schema:
        return Format(tokenizer, [compiled(params.json_schema)])
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
    ok = [code for c, code in chars.items() if constraint._feed(c) is not None]
    fits = torch.isin(codes, torch.tensor(ok, dtype=codes.dtype)).to(row.device)
    order = torch.argsort(row.float().masked_fill(~fits, float("-inf")), descending=True)[: int(fits.sum())].tolist()
    for lo in range(0, len(order), _BLOCK):
        allowed = [t for t in order[lo:lo + _BLOCK] if constraint.allows(t, eos_ids)]
        if allowed:
            return allowed
    return []
