"""When a pass copies a streamed lm_head ahead (streamer.lent), and into how much memory.

A pass that feeds at least a prefill chunk of prompt tokens is bound by its compute, and its copies are
done long before its last layer; only the lm_head's chunks past the staging slots then wait, one slot at a
time, after the last layer (streamer.lent says how long). Such a pass lends the streamer buffers for
them from the memory the plan set aside for prompt states that this pass does not fill: the plan sizes
``prefill_state_bytes`` for the longest prompts the context allows (``batch`` x ``max_context`` tokens),
and a pass of R rows keeps R rows of states (hidden and residual). On a GPU the room is also held within
what the allocator's cap leaves beside the live tensors, the pass's activations and states. Not used with
host states (their copies share the copy stream by design) nor with captured prompt graphs (their pool
already takes that room), nor when a pass runs again after running out of memory (engine.serving.retry).

``LAYERSTREAM_HEAD_AHEAD=1`` turns it on (off by default until timed on a GPU).
"""

from __future__ import annotations

import os

import torch

MARGIN = 64 << 20  # bytes left unlent beside the pass's own peak (as the plan's allocator allowance)


def wanted() -> bool:
    """Whether compute-bound prompt passes copy the lm_head ahead (``LAYERSTREAM_HEAD_AHEAD=1``)."""
    return os.environ.get("LAYERSTREAM_HEAD_AHEAD", "0").strip().lower() in ("1", "on", "true", "yes")


def room(model, rows: int, host_states: bool, graphs: bool) -> int:
    """Bytes a pass over ``rows`` token rows may lend for the lm_head's chunks (0: none)."""
    plan = model.weights.plan
    if not wanted() or not model.lend_head or host_states or graphs or plan.lm_head_resident or rows < plan.prefill_chunk:
        return 0
    states = rows * 2 * model.cfg.hidden_size * model.dtype.itemsize
    lend = plan.prefill_state_bytes - states
    if model.device.type == "cuda":
        activations = plan.workspace_bytes - plan.prefill_state_bytes
        free = plan.allocator_bytes - torch.cuda.memory_allocated(model.device) - activations - states
        lend = min(lend, free)
    return max(0, lend - MARGIN)
