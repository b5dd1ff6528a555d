"""Packing a step's prompt slices into groups that share their kernel launches."""

from __future__ import annotations

from collections import Counter


def pack_rows(lengths: list[int], limit: int) -> list[list[int]]:
    """Indices of ``lengths`` in groups whose size x longest member stays within ``limit`` (the
    padded token count of a [rows, longest] group): longest first, each into the first group it fits,
    so similar lengths share a group and the padding stays small. Groups in order of their longest
    member, longest first; members in that order too. A length over ``limit`` gets a group of its own."""
    assert all(n > 0 for n in lengths) and limit > 0
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for g in groups:
            if (len(g) + 1) * lengths[g[0]] <= limit:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def stack_free(parts: list[list[tuple]], first: int) -> set[int]:
    """The indices (from ``first``) of the prompt groups ``parts`` whose sequences have no other group in the pass:
    they may run in any order (``engine.stacking``); a long prompt's slices keep theirs."""
    count = Counter(s.seq_id for part in parts for s, _, _ in part)
    return {first + k for k, part in enumerate(parts) if all(count[s.seq_id] == 1 for s, _, _ in part)}


MIN_CUT = 16  # no slice cut off to fill a stack is shorter than this


def stack_slices(prompts: list[tuple], chunk: int, stack_rows: int) -> list[tuple]:
    """Each ``(sequence, start, tokens)`` (a prompt, or a slice of one: a sequence's in order) as slices
    ``(sequence, start, tokens)`` in order, each of at most ``chunk`` tokens. With ``stack_rows`` > 0 a slice also
    ends where the stack the slices fill in order (``engine.stacking``'s units: consecutive slices up to
    ``stack_rows`` rows) is full, and the prompt goes on in the next stack: the pass has about as few units as its rows need (each unit widens and launches every
    projection of every layer again). A stack with less than ``MIN_CUT`` rows of room takes no cut slice; the rest
    of a cut is at least 2 tokens (a slice of one token runs as a unit of its own)."""
    out: list[tuple] = []
    fill = 0  # rows of the stack being filled
    for s, a, n in prompts:
        end = a + n
        while a < end:
            take = min(end - a, chunk)
            if stack_rows > 0:
                take = min(take, stack_rows)
                room = stack_rows - fill
                if take > room:  # the stack overflows: cut the slice to its room (leaving at least 2 tokens: one
                    # would run alone), or, with less than MIN_CUT rows of room, open the next stack
                    cut = room if end - a - room >= 2 else room - 1
                    take, fill = (cut, fill) if cut >= MIN_CUT else (take, 0)
                fill = (fill + take) % stack_rows if take > 1 else 0  # one token: a unit alone (engine.stacking)
            out.append((s, a, take))
            a += take
    return out
