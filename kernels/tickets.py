"""Ticket counters that let the last program of a group finish the group's work in the same kernel.

Split kernels (split-KV decode attention, split-K GEMV) write fp32 partials; instead of a second
kernel that merges them, each program takes a ticket from its group's int32 counter after its
partials, and the program drawing the last ticket merges and writes the output, then resets the
counter to 0 so the next launch finds it zeroed. The counters are persistent per (device, user)
so that a CUDA graph captured on them replays without a memset node.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}  # zero between launches
_OUTGROWN: list[torch.Tensor] = []  # replaced buffers stay alive: graphs captured on them replay


def counters(device: torch.device, n: int, user: str) -> torch.Tensor | None:
    """>= n zeroed ticket counters on device for one kernel family (``user``); None if they would
    need allocating during a CUDA-graph capture (the caller then launches its two-kernel path:
    a memset node in the graph would hide a missing reset)."""
    key = (device, user)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(2 * n, 1024), device=device, dtype=torch.int32)
    return buf


@triton.jit
def last_ticket(cnt_ptr, member, n_members):
    """Whether this program finishes its group: the one of the n_members programs that draws the
    last ticket (member 0 if n_members is 0; members >= n_members take none). The debug barrier
    orders every thread's partial stores before the atomic, which one thread issues (its result
    is broadcast to all); acq_rel at gpu scope releases them and, in the last program, acquires
    those of all the earlier tickets. The last program must reset the counter to 0."""
    last = (n_members == 0) & (member == 0)
    if member < n_members:
        tl.debug_barrier()
        last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n_members - 1
    return last
