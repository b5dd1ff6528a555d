"""How many prompt tokens a streamed pass takes, and in what order prompts take them.

A streamed pass pays one stream of the non-resident weights whatever it computes (``stream_s``: the
time of a pass that only decodes); the prompt tokens fed beside it are compute that overlaps that
stream. A pass that takes every waiting prompt makes every first token, and every decoding row's next
token, wait for its end: on the H200 at 6 GiB, 16 clients' 18,906 prompt tokens in one pass took 1.0 s,
four times a decode step. Passes sized to about ``STREAMS`` weight streams give the shortest prompts
(``prompt_order``) their first token after the first such pass: the issue's TTFT target is two step
times plus a request's own prefill. But a pass with prompts also has a fixed cost beyond its tokens
(measured there: ~0.19 s with 16 decoding rows, ~0.4 s with 32), so many small passes delay the last
prompts of a burst (32 clients: ~7 passes, TTFT p99 5.1 s). Hence ``room``: at least the shorter half
of the waiting prompts (by count, with the median one), the rest whole in the next pass (the runner):
two passes a burst at most, the median request's first token from the first. (Half the waiting tokens
instead put 11-12 of 16 prompts in a first pass of 9,453 tokens, 0.93 s on the H200, session 19.)

Both figures are learned from the server's own timed passes: ``stream_s``, an exponential average
of decode-only passes; ``token_s`` (seconds per prompt token), time / prompt tokens of a pass that fed
prompts. A pass that took longer than ``BOUND`` streams was bound by its tokens: at the operating point
(a pass of ``STREAMS x stream_s``) its ratio is the true cost per token, and it replaces what was known.
A pass bound by the stream (its tokens hid under it) gives only an upper bound: it lowers ``token_s``,
never raises it, so the next budget is at least ``STREAMS / BOUND`` times that pass's tokens and the
passes grow until one is bound by its tokens. (Forgetting the cost there instead let the next burst
take every waiting token: on the H200, 16 clients' 18,906 tokens in one pass of 1.45 s, session 19.)
Until both figures are known (the first prompts after start) the budget is the floor, so a burst's
room is its shorter half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.serving.sequence import Sequence

STREAMS = 2.0  # a pass with prompts aims at this many weight streams' time
ALPHA = 0.5  # weight of the newest decode-only pass in the stream's average
MIN_PROMPT_TOKENS = 64  # passes feeding fewer prompt tokens tell little about the cost per token
BOUND = 1.5  # a pass with prompts shorter than this many streams was bound by the stream


class PassCost:
    """Learns a streamed pass's stream time and cost per prompt token; gives the next pass's budget."""

    def __init__(self) -> None:
        self.stream_s: float | None = None
        self.token_s: float | None = None

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        """One timed pass (host clock, synchronized at its end) that fed ``prompt_tokens`` prompt tokens."""
        assert prompt_tokens >= 0 and seconds >= 0
        if prompt_tokens == 0:
            self.stream_s = _average(self.stream_s, seconds)
        elif prompt_tokens >= MIN_PROMPT_TOKENS:
            ratio = seconds / prompt_tokens
            bound = self.stream_s is not None and seconds < BOUND * self.stream_s
            self.token_s = min(self.token_s, ratio) if bound and self.token_s else ratio

    def budget(self, floor: int, cap: int) -> int:
        """Prompt tokens for the next pass: ``STREAMS`` streams' worth at the learned cost, within
        [``floor``, ``cap``]; ``floor`` while either figure is unknown."""
        if self.stream_s is None or not self.token_s:
            return min(floor, cap)
        return max(floor, min(cap, int(STREAMS * self.stream_s / self.token_s)))

    def room(self, prompts: list[int], floor: int, cap: int) -> int:
        """Prompt tokens for the next pass, given the tokens each waiting prompt has left: the budget, or
        if that is more the tokens of the shorter half of the prompts and the median one (``n // 2 + 1``
        of them, fewest first: a burst's median request gets its first token from the first pass, the
        runner feeds the prompts passed over whole in the next); never less than the shortest prompt, so
        a lone prompt is never cut into two streams."""
        shortest = sorted(prompts)[: len(prompts) // 2 + 1]
        return max(self.budget(floor, cap), sum(shortest))

    def reset(self) -> None:
        self.stream_s = self.token_s = None


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


MAX_DEFERRED = 4  # all resident: passes a prompt may be passed over before it goes first (oldest first)


def prompt_order(most: int, s: Sequence) -> tuple[int, int, int]:
    """The order prompts take a pass's room in: those passed over
    ``most`` times first, oldest first; then the fewest tokens left first (the most first tokens per
    pass: the median request's wait is shortest), oldest first among equals."""
    if s.deferred >= most:
        return (0, 0, s.seq_id)
    return (1, s.pending, s.seq_id)
