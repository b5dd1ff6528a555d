"""Per-request generation parameters (the OpenAI / vLLM set the sampler supports)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.sampling import SEED_MAX, SamplingParams as TokenSamplingParams
from engine.serving.schema import compiled


MAX_STOP_STRINGS = 32  # stop strings a request may give (OpenAI's API: 4; many cost every request a step's time)


class FieldError(ValueError):
    """A ValueError about one request field: the server's 400 names it as the error's ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature`` 0 (or below 1e-5) is greedy; ``top_k`` 0, ``top_p`` 1.0 and ``min_p`` 0.0 disable those filters.
    ``max_tokens`` None generates until a stop condition or the end of the context. ``logprobs`` k returns each
    token's log-probability under the model (before temperature, filters and penalties) and the k most likely
    alternatives. ``n`` completions of the same prompt are generated (with a seed, completion i uses
    ``seed + i``). ``presence_penalty`` and ``frequency_penalty`` follow OpenAI (on generated tokens),
    ``repetition_penalty`` follows Hugging Face (on prompt and generated tokens), ``logit_bias`` OpenAI.
    ``stop_token_ids`` (vLLM's) end the reply when one is sampled, as eos does (also with ``ignore_eos``).
    At most one format holds the reply (engine.serving.constrain): ``json_object`` one JSON object,
    ``json_schema`` (a JSON Schema as JSON text) what the schema accepts, ``tool_call`` one call of one of
    these tools.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    n: int = 1
    ignore_eos: bool = False
    logprobs: int | None = None  # with each token its log-probability and this many top alternatives
    json_object: bool = False  # the reply held to one JSON object (engine.serving.json_mode)
    tool_call: tuple[str, ...] | None = None  # the reply held to one call of one of these tools (a forced tool_choice)
    json_schema: str | None = None  # the reply held to this JSON Schema, as JSON text (engine.serving.schema)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's -100..100
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: sampling one ends the reply ("stop"), left out of it, as eos is

    def __post_init__(self) -> None:
        if self.stop is None:  # as vLLM takes it
            object.__setattr__(self, "stop", ())
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise FieldError("stop", f"stop must be non-empty strings, got {list(self.stop)!r}")
        if len(self.stop) > MAX_STOP_STRINGS:  # each is matched against every new token's text on the engine's thread
            raise FieldError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}: "
                                     "send fewer (OpenAI's API takes 4)")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 16:
            raise ValueError(f"n must be an integer in 1..16, got {self.n!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in 0..20 (or None), got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -2.0 <= value <= 2.0):
                raise ValueError(f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise FieldError("logit_bias", f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not (isinstance(bias, (int, float)) and math.isfinite(bias) and -100 <= bias <= 100):
                raise FieldError("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {bias!r} "
                                               f"for token {token}")
        formats = [f for f in ("json_object", "json_schema", "tool_call") if getattr(self, f)]
        if formats and self.ignore_eos:
            raise ValueError(f"{formats[0]} ends the reply when it is whole: leave ignore_eos off")
        if len(formats) > 1:
            raise ValueError(f"{formats[0]} and {formats[1]} each hold the reply to a format: give one")
        if self.json_schema is not None:
            compiled(self.json_schema)  # ValueError for a schema that cannot be held
        if self.tool_call is not None:
            object.__setattr__(self, "tool_call", tuple(self.tool_call))
            if not self.tool_call or not all(isinstance(n, str) and n for n in self.tool_call):
                raise ValueError(f"tool_call must name at least one tool, got {self.tool_call!r}")
        self.token_params(0)  # the sampler's own checks (temperature, top_k, top_p, min_p, seed)

    def token_params(self, index: int) -> TokenSamplingParams:
        """The sampler's parameters for completion ``index`` of this request."""
        seed = self.seed
        if seed is not None and index:  # wrapped to 64 bits (torch seeds a negative seed as its two's complement)
            seed = (seed + index) % (SEED_MAX + 1)
        return TokenSamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=seed)

    @property
    def penalised(self) -> bool:
        """Whether any penalty (or a logit bias) changes the logits."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))


def _token_ids(name: str, value) -> tuple[int, ...]:
    """``value`` (a list of token ids, or None) as a tuple; ValueError naming ``name`` for anything else."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                   for t in value):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {value!r}")
    return tuple(value)
