"""Which groups of a pass share each layer's projections (``Model.layer_stacked``): the pass's *units*.

A unit is one group, or a run of groups whose token rows are stacked into one [1, R] row (padding included),
R at most ``stack_rows`` (the activation workspace the plan sized for one prompt chunk). Every unit costs each
layer its own launches (a norm, each projection's dequantization and GEMM, the MLP's activation): a streamed pass
with many prompts is bound by the host issuing them (session 27, the 7B AWQ's 16-prompt burst on an H200: 2,976
launches, 184 ms of kernels in a 376 ms pass), so fewer units is a shorter pass.

Two ways to form units:

- in order (``free`` None): consecutive prompt groups join a run while their rows fit; a decode group stays alone.
- packed (``free`` given: the groups whose sequences have no other group in the pass, so they may run in any
  order): those groups are packed first-fit by decreasing rows into as few units as fit, and the pass's decode
  group (the first group, one token a row) heads the first of them instead of running alone (its rows ride on a
  GEMM that reads the weights anyway). The other groups (a long prompt's slices, which must run in order) keep
  their order after it. The decode group stays ahead of every prompt group: on a slot cache its padding rows
  write past their sequences' cached positions, where a prompt of that slot then writes its own keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.groups import Group


def stacked_runs(groups: list[Group], stack_rows: int, free: set[int] | None = None) -> list[list[int]]:
    """The pass's units as lists of group indices (each in the groups' order), in run order (see the module
    docstring); ``stack_rows`` 0: every group alone."""
    if free is None or stack_rows <= 0:
        return _in_order(groups, range(len(groups)), stack_rows)
    decode = [0] if groups and groups[0].ids.shape[1] == 1 and groups[0].ids.numel() <= stack_rows else []
    packable = sorted((k for k in free if k not in decode and 0 < groups[k].ids.numel() <= stack_rows),
                      key=lambda k: (-groups[k].ids.numel(), k))
    bins: list[list[int]] = [list(decode)] if decode else []
    rows = [groups[0].ids.numel()] if decode else []
    for k in packable:
        n = groups[k].ids.numel()
        at = next((b for b, r in enumerate(rows) if r + n <= stack_rows), None)
        if at is None:
            bins.append([k])
            rows.append(n)
        else:
            bins[at].append(k)
            rows[at] += n
    taken = set(decode).union(packable)
    rest = _in_order(groups, [k for k in range(len(groups)) if k not in taken], stack_rows)
    bins = [sorted(b) for b in bins]
    return bins[:1] + rest + bins[1:] if decode else rest + bins


def _in_order(groups: list[Group], order, stack_rows: int) -> list[list[int]]:
    """``order``'s groups split into runs: consecutive groups of more than one token a row whose rows add up to
    at most ``stack_rows``; every other group alone (a decode group keeps its own GEMV)."""
    runs: list[list[int]] = []
    total = stack_rows + 1  # the last run's rows; past the limit: nothing joins it (none yet, or a decode group)
    for k in order:
        g = groups[k]
        n, prompt = g.ids.numel(), g.ids.shape[1] > 1
        if prompt and total + n <= stack_rows:
            runs[-1].append(k)
            total += n
        else:
            runs.append([k])
            total = n if prompt else stack_rows + 1
    return runs


def run_pick(groups: list[Group], runs: list[list[int]],
             pick: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``pick``'s (group, row, token) as (unit, row, token) of ``runs``' units: a stacked run is one [1, R] row."""
    where: dict[int, tuple[int, int]] = {}  # group -> (its unit, rows of the unit before it)
    for u, run in enumerate(runs):
        off = 0
        for k in run:
            where[k] = (u, off)
            off += groups[k].ids.numel()
    out = []
    for g, r, j in pick:
        u, off = where[g]
        out.append((u, r, j) if len(runs[u]) == 1 else (u, 0, off + r * groups[g].ids.shape[1] + j))
    return out
