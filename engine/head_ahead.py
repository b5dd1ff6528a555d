"""When a pass copies a streamed lm_head ahead (streamer.lent), and into how much memory.

A pass that feeds at least a prefill chunk of prompt tokens is bound by its compute, and its copies are
done long before its last layer; only the lm_head's chunks past the staging slots then wait, one slot at a
time, after the last layer (streamer.lent says how long). Such a pass lends the streamer buffers for
them from the memory the plan set aside for prompt states that this pass does not fill: the plan sizes
``prefill_state_bytes`` for the longest prompts the context allows (``batch`` x ``max_context`` tokens),
and a pass of R rows keeps R rows of states (hidden and residual). On a GPU the room is also held within
what the allocator's cap leaves beside the live tensors, the pass's activations and states (states in host
memory: see ``room``). Not used with captured prompt graphs (their pool already takes that room), nor when a pass runs again after running out of memory (engine.serving.retry).

The same room serves a layer's weights widened once for all of a pass's units (engine.dense_layer) first,
where that is on and the pass has several units: that saves more of a burst's first pass (~18 of its 24.7 ms
of widening, against the lm_head's 15.0 ms wait) and needs less (a 7B layer widened: 444 MiB, its lm_head's
chunks past the slots: 812 MiB); the lm_head gets what is left.

``LAYERSTREAM_HEAD_AHEAD=1`` turns it on (off by default until timed on a GPU).
"""

from __future__ import annotations

import os

import torch

from engine import dense_layer

MARGIN = 64 << 20  # bytes left unlent beside the pass's own peak (as the plan's allocator allowance)


def wanted() -> bool:
    """Whether compute-bound prompt passes copy the lm_head ahead (``LAYERSTREAM_HEAD_AHEAD=1``)."""
    return os.environ.get("LAYERSTREAM_HEAD_AHEAD", "0").strip().lower() in ("1", "on", "true", "yes")


def split(model, rows: int, units: int, host_states: bool, graphs: bool) -> tuple[int, int]:
    """(bytes for a layer widened once, engine.dense_layer; bytes to lend for the lm_head's chunks) in a pass
    over ``rows`` token rows in ``units`` units; (0, 0) when neither is on or the pass may not spare any."""
    dense_on = dense_layer.wanted() and units > 1
    head_on = wanted() and not model.weights.plan.lm_head_resident
    if not (dense_on or head_on):
        return 0, 0
    spare = room(model, rows, host_states, graphs)
    need = dense_layer.layer_bytes(model.cfg, model.dtype.itemsize)
    dense = need if dense_on and need <= spare else 0
    return dense, spare - dense if head_on else 0


def room(model, rows: int, host_states: bool, graphs: bool) -> int:
    """Bytes a pass over ``rows`` token rows may spare for a pass's own buffers (0: none). Its states in VRAM: the
    planned states' room it leaves (within the cap's). In host memory (parked in the KV cache's unreached
    positions, or crossing PCIe: the plan's states room then holds the chunks in flight): what the allocator's cap
    leaves beside the live tensors and the whole workspace, on a GPU only (a pass that then runs out of memory runs
    again without, engine.serving.retry)."""
    plan = model.weights.plan
    if not model.lend_head or graphs or rows < plan.prefill_chunk:
        return 0
    states = 0 if host_states else rows * 2 * model.cfg.hidden_size * model.dtype.itemsize
    if model.device.type != "cuda":
        return 0 if host_states else max(0, plan.prefill_state_bytes - states - MARGIN)
    workspace = plan.workspace_bytes - (0 if host_states else plan.prefill_state_bytes - states)
    free = plan.allocator_bytes - torch.cuda.memory_allocated(model.device) - workspace
    return max(0, min(free, plan.prefill_state_bytes - states if not host_states else free) - MARGIN)
