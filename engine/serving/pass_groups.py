"""A served pass's groups, built from its sequences: the decoding rows' group and each group of prompt slices,
with (paged cache) the bindings of their rows to blocks. ``engine.serving.runner`` runs them."""

from __future__ import annotations

import torch

from engine.groups import Group
from engine.serving.blocks import BlockManager
from engine.serving.paged_cache import BindSpec, PagedKVCache
from engine.serving.sequence import Sequence
from engine.upload import upload_list

Paged = tuple[PagedKVCache, BlockManager] | None


def id_grid(rows: int, t: int, fills) -> torch.Tensor:
    """Token ids [rows, t] on the host, zero-padded, row r starting with the ids ``fills`` gives it as
    (r, ids) pairs: built as lists and made one tensor (a torch call per row costs the host more)."""
    grid = [[0] * t for _ in range(rows)]
    for r, ids in fills:
        grid[r][: len(ids)] = ids
    return torch.tensor(grid, dtype=torch.long)


def slice_group(part: list[tuple[Sequence, int, int]], paged: Paged,
                device: torch.device) -> tuple[Group, BindSpec | None]:
    """One group of prompt slices: row r feeds ``part[r]``'s tokens (sequence, start, tokens), right-padded to the
    longest; with a paged cache, its rows' blocks reserved up to their slices' ends."""
    t = max(n for _, _, n in part)
    ids = id_grid(len(part), t, ((r, s.all_ids[a: a + n]) for r, (s, a, n) in enumerate(part)))
    start, lens = [a for _, a, _ in part], [n for _, _, n in part]
    group = Group(ids, upload_list(start, torch.int32, device), upload_list(lens, torch.int32, device),
                  part[0][0].slot, max(a + n for _, a, n in part))
    if not paged:
        return group, None
    return group, BindSpec([paged[1].reserve(s.seq_id, a + n) for s, a, n in part], start, lens, t)


def decode_group(seqs: list[Sequence], decode: list[Sequence], paged: Paged, direct: bool,
                 device: torch.device) -> tuple[Group, BindSpec | None]:
    """Rows 0 .. the highest decoding slot of ``decode``, one token each, and (paged) their binding: in place
    through the block tables when ``direct`` (the kernels read them). ``seqs``: every sequence of the pass."""
    d_rows = max(s.slot for s in decode) + 1
    start, q_lens = [0] * d_rows, [0] * d_rows
    if paged is None:  # a slot row that is not decoding writes its padding past its cached positions
        for s in seqs:
            if s.slot < d_rows:
                start[s.slot] = s.num_computed
    for s in decode:
        start[s.slot], q_lens[s.slot] = s.num_computed, 1
    ids = id_grid(d_rows, 1, ((s.slot, [s.all_ids[s.num_computed]]) for s in decode))
    # max_len covers every row's cached positions and the padding written after them, so the rows' tails
    # past it are unreached (parked prompt states may wait there: engine.state_parking)
    group = Group(ids, upload_list(start, torch.int32, device), upload_list(q_lens, torch.int32, device), 0,
                  max(start) + 1)
    if paged is None:
        return group, None
    tables: list[list[int]] = [[] for _ in range(d_rows)]  # a row that is not decoding reads no key
    for s in decode:
        tables[s.slot] = paged[1].reserve(s.seq_id, s.num_computed + 1)
    return group, BindSpec(tables, start, q_lens, 1, direct=direct)
