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
