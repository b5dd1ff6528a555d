"""Sampling held to a format (JSON mode: engine.serving.json_mode): which tokens a sequence may take next.

The row is sampled as usual first; the token is kept when its text continues the format (nearly always, for
a model asked for JSON). Otherwise the draw is repeated among the tokens the format allows, taken in order of
logit: the first TOP of them, then, if none of those is allowed, the rest of the vocabulary in blocks. Greedy
rows take the most likely allowed token; others draw from the allowed ones' softmax at the row's temperature
(top-k / top-p / min-p are not applied to that second draw). Special tokens other than end of sequence are
never allowed (their text is dropped from replies); end of sequence only once the object is closed, and then
nothing else.
"""

from __future__ import annotations

import weakref

import torch

from engine.serving import json_mode

TOP = 256  # candidates tried before the rest of the vocabulary
_BLOCK = 4096
_texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {token id: its text}


def token_text(tokenizer, token: int) -> str:
    """A token's text as a reply shows it ("" for special tokens), cached per tokenizer."""
    cache = _texts.setdefault(tokenizer, {})
    text = cache.get(token)
    if text is None:
        text = cache[token] = tokenizer.decode([token], skip_special_tokens=True)
    return text


class JsonObject:
    """A sequence's JSON-mode state: the recogniser's state after the tokens taken so far."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.state = json_mode.START

    @property
    def closed(self) -> bool:
        return json_mode.done(self.state)

    def allows(self, token: int, eos_ids: set[int]) -> bool:
        if token in eos_ids:
            return self.closed
        text = token_text(self.tokenizer, token)
        return bool(text) and json_mode.feed(self.state, text) is not None

    def advance(self, token: int, eos_ids: set[int]) -> None:
        if token not in eos_ids:
            self.state = json_mode.feed(self.state, token_text(self.tokenizer, token))
            assert self.state is not None, token


def constrained_token(row: torch.Tensor, drawn: int, constraint: JsonObject, eos_ids: set[int],
                      temperature: float, generator: torch.Generator | None) -> int:
    """The token to take from ``row`` [V] (logits after penalties) given the unconstrained ``drawn``: it, when
    the format allows it, else a draw among the allowed ones (end of sequence if none is: a vocabulary without
    the characters of JSON ends the reply there)."""
    if constraint.allows(drawn, eos_ids):
        return drawn
    if constraint.closed and eos_ids:
        return min(eos_ids)
    order = torch.argsort(row.float(), descending=True).tolist()
    for lo, hi in [(0, TOP)] + [(b, b + _BLOCK) for b in range(TOP, len(order), _BLOCK)]:
        allowed = [t for t in order[lo:hi] if constraint.allows(t, eos_ids)]
        if allowed:
            break
    else:
        return min(eos_ids) if eos_ids else drawn
    if temperature <= 0 or len(allowed) == 1:
        return allowed[0]
    ids = torch.tensor(allowed, device=row.device)
    probs = torch.softmax(row[ids].float() / temperature, dim=0)
    return allowed[int(torch.multinomial(probs, 1, generator=generator))]
