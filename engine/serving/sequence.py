"""One sequence being generated: its tokens, its KV slot, its text and how it ended."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.detok import IncrementalDetokenizer, StopStringMatcher
from engine.serving.constrain import reply_format
from engine.serving.params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqOutput:
    """What one step produced for one sequence (sent to its sink)."""

    seq: Sequence
    text: str  # printable text added this step ("" while a character or a stop string is incomplete)
    token_ids: list[int]  # tokens added this step
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    logprobs: list[Logprob] | None = None  # one per token in token_ids when the request asked for them


@dataclass
class Logprob:
    """A generated token's log-probability and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


class Sequence:
    """A prompt and the tokens generated after it.

    ``num_computed`` tokens of ``all_ids`` are in the KV cache; the rest (the prompt still to prefill,
    or the last sampled token) is fed at the next step. ``sink`` receives a :class:`SeqOutput` after
    every step that changed the sequence; it is called on the scheduler's thread and must not block.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, index: int = 0,
                 sink: Callable[[SeqOutput], None] | None = None, request_id: str = "",
                 choice: int | None = None) -> None:
        """``index``: the choice's number in its response; ``choice``: its number among its prompt's ``n``
        completions, which seeds it (``seed + choice``; default ``index``), so that a prompt's texts do not depend
        on where it sits in a request's list of prompts."""
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        self.seq_id = next(_ids)
        self.request_id = request_id or f"seq-{self.seq_id}"
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.logprobs: list[Logprob] = []
        self.params = params
        self.token_params = params.token_params(index if choice is None else choice)
        self.sink = sink
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the engine gave up on it (finish_reason "abort"), for the client
        self.slot: int | None = None
        self.num_computed = 0
        # passes in a row that fed none of this prompt (streamed: 1 after one that cut it short too); the
        # order prompts take a pass's room in (engine.serving.passcost.prompt_order)
        self.deferred = 0
        self.text = ""
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, context_ids=self.prompt_ids)
        self.stops = StopStringMatcher(list(params.stop))
        self.sampler = None  # engine.sampling.Sampler, made by the runner on first use (it owns the seed)
        self.constraint = reply_format(params, tokenizer)  # what the next token may be (None: anything)
        self.arrival = time.monotonic()
        self.received = self.arrival  # when its request reached the server's app (set by engine.serving.app)
        self.first_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return self.length - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int, eos_ids: set[int], max_context: int, logprob: Logprob | None = None) -> SeqOutput:
        """Take a sampled token: eos, a stop token, stop strings, max_tokens and the context end may finish the
        sequence (eos and stop tokens are left out of the reply)."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if token in eos_ids and not self.params.ignore_eos or token in self.params.stop_token_ids:
            return self._finish("stop", "", [], tail=self.detok.flush())
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        safe, stopped = self.stops.push(self.detok.push(token))
        if stopped:
            return self._finish("stop", safe, [token])
        limit = self.params.max_tokens
        if (limit is not None and len(self.output_ids) >= limit) or self.length >= max_context:
            return self._finish("length", safe, [token], tail=self.detok.flush())
        self.text += safe
        return SeqOutput(self, safe, [token], False, None, self._new_logprobs(1))

    def abort(self) -> SeqOutput:
        """Finish now (a cancelled request, a server shutting down)."""
        return self._finish("abort", "", [])

    def fail(self, message: str) -> SeqOutput:
        """Finish now because the engine cannot go on with it; ``message`` says why, for the client."""
        self.error = message
        return self.abort()

    def _finish(self, reason: str, text: str, tokens: list[int], tail: str | None = None) -> SeqOutput:
        """``text`` is already past the stop matcher; ``tail`` (the detokenizer's held-back end) is not."""
        if tail is not None:
            more, _ = self.stops.push(tail)
            text += more + self.stops.flush()
        self.text += text
        self.status, self.finish_reason = Status.FINISHED, reason
        return SeqOutput(self, text, tokens, True, reason, self._new_logprobs(len(tokens)))

    def _new_logprobs(self, n: int) -> list[Logprob] | None:
        if self.params.logprobs is None:
            return None
        return self.logprobs[len(self.logprobs) - n:] if n else []
