"""A stacked unit's prompt slices through RoPE + KV append and the attention in one launch each, not one a group.

``DecoderLayers.layer_stacked`` runs each layer's projections once over a unit's stacked rows, but its attention
group by group: on the H100 the 16-prompt burst's first pass launched RoPE + append and the prompt attention 672
times (12 groups a layer), and its GPU sat 26 ms of the pass waiting for the host before those launches
(bench/results/2026-12-06-h100-s44/call5/). Where the unit's trailing groups are prompt slices (T > 1) on the
shared contiguous cache (a slot cache: each group's rows of ``cache.layer(i)``), :func:`plan_unit` lays out, once
a pass, where each of their sequences' rows, keys and positions are, so that every layer runs them as one
``rope_kv_append_`` with per-token cache rows and one ``attention_prefill_varlen`` (kernels/). All their keys are
appended before any of them attends, which is what group by group gives too: a later slice of a prompt reads the
earlier slice's keys, and nothing reads past its own position. On by default since it was timed on an H100
(bench/results/2026-12-06-h100-s45/call1/): the 16-prompt burst's first pass 219-235 ms against 243-266 ms, the
served cold burst's TTFT p50 232 ms against 295 ms at 16 clients, no kernel built while serving (the warm-up
compiles its specialisations); ``LAYERSTREAM_VARLEN_PREFILL=0`` runs the slices group by group as before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.switches import switch_on
from engine.upload import upload_list

if TYPE_CHECKING:
    from engine.groups import Group


def enabled() -> bool:
    """Whether stacked prompt slices run as one launch each (on unless ``LAYERSTREAM_VARLEN_PREFILL=0``)."""
    return switch_on("LAYERSTREAM_VARLEN_PREFILL")


@dataclass
class VarlenPlan:
    """Groups ``first ..`` of a unit (rows ``row0 .. row0 + rows`` of its stack), as one flat batch: per token
    its RoPE table row (``positions`` [1, rows]), cache position and cache row (int32 [rows]); per sequence its
    span's first row (relative to ``row0``) and length (``seq_rows`` int32 [2, n]), start position, real rows
    and cache row (int32 [n]); ``max_rows`` the longest span."""

    first: int
    row0: int
    rows: int
    max_rows: int
    positions: torch.Tensor
    cache_pos: torch.Tensor
    cache_row: torch.Tensor
    seq_rows: torch.Tensor
    start: torch.Tensor
    q_lens: torch.Tensor
    seq_cache_row: torch.Tensor
    spans: list[int] | None = None  # each sequence's rows, on the host (a captured layout's block table)
    blocks: torch.Tensor | None = None  # the attention's row blocks as a table (engine/prompt_graphs.py), or none
    block_m: int = 0  # the rows of a table's block


def plan_unit(groups: list[Group], positions: list[torch.Tensor], device: torch.device,
              least: int = 2) -> VarlenPlan | None:
    """The plan of a stacked unit's trailing prompt slices (``groups`` in stack order, ``positions`` their
    [B, T] table rows), or None when fewer than ``least`` of them end the unit (a decode group, T = 1, runs the
    decode attention; a group with its own ``kv`` view reads no shared cache)."""
    first = len(groups)
    while first > 0 and groups[first - 1].ids.shape[1] > 1 and groups[first - 1].kv is None:
        first -= 1
    if len(groups) - first < least:
        return None
    tail, row0 = groups[first:], sum(g.ids.numel() for g in groups[:first])
    spans = [g.ids.shape[1] for g in tail for _ in range(g.ids.shape[0])]  # a sequence's rows: its group's T
    starts = [0, *itertools.accumulate(spans)]
    r, i32 = starts.pop(), torch.int32
    seq_rows = upload_list(starts + spans, i32, device).view(2, -1)
    seq_cache_row = upload_list([g.row0 + j for g in tail for j in range(g.ids.shape[0])], i32, device)
    return VarlenPlan(
        first=first, row0=row0, rows=r, max_rows=max(spans),
        positions=torch.cat([p.reshape(-1) for p in positions[first:]]).view(1, r),
        cache_pos=torch.cat([_cache_positions(g, device) for g in tail]).to(i32),
        cache_row=seq_cache_row.repeat_interleave(seq_rows[1], output_size=r),  # no host sync: r is known
        seq_rows=seq_rows, start=torch.cat([g.start_pos.to(device) for g in tail]).to(i32),
        q_lens=torch.cat([g.q_lens.to(device) for g in tail]).to(i32), seq_cache_row=seq_cache_row, spans=spans)


def _cache_positions(g: Group, device: torch.device) -> torch.Tensor:
    """Each token's cache position (start + t), -1 (nothing written) for right padding (t >= q_lens): in one
    launch a padded row's padding and the next slice of that row would write the same slots in no set order."""
    t = torch.arange(g.ids.shape[1], device=device)
    pos = g.start_pos.to(device).long().view(-1, 1) + t
    return torch.where(t < g.q_lens.to(device).view(-1, 1), pos, -1).reshape(-1)
