"""What the planner knows of a model: plain numbers, no tensor names and no model config.

``engine.footprint`` translates a model (config, checkpoint, compute dtype, quantization) into a
:class:`Footprint`; the planner only adds, compares and divides these figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ALLOCATOR_ALLOWANCE = 64 << 20  # caching-allocator slack, cuBLAS workspace
# a layer-major prefill with prompt states in host memory keeps this many chunk-sized staging buffers
# (engine.prefill_states.HostStates): the host runs up to HOST_STATE_RING - 1 chunks ahead of the copies.
# A ring of 3 ran out of memory at 4 GiB on a 32k-token prompt (session 14) while gaining nothing measurable
HOST_STATE_RING = 2

ModuleKind = Literal["embedding", "layer", "norm", "lm_head"]


@dataclass(frozen=True)
class Module:
    """One placeable piece of a model.

    ``bytes`` is what it occupies in VRAM when resident and what crosses PCIe each step when
    streamed (the packed form the kernels read); ``file_bytes`` is what the checkpoint files hold
    for it (the cost of reading it from disk).
    """

    name: str  # "embed_tokens", "layers.0", ..., "norm", "lm_head"
    kind: ModuleKind
    bytes: int
    file_bytes: int


@dataclass(frozen=True)
class Footprint:
    """A model's modules and the per-token costs of running it, in bytes."""

    modules: tuple[Module, ...]  # execution order: embedding, layers, norm, lm_head
    rows: int  # vocabulary rows of the embedding and of lm_head
    tied: bool  # lm_head is the embedding table (one tensor, one copy)
    kv_bytes_per_token: int  # K and V of every layer, one position of one sequence
    act_bytes_per_token: int  # activations of one token of a prefill pass
    state_bytes_per_token: int  # what a prompt token keeps between layers in a layer-major prefill
    logits_bytes_per_seq: int  # fp32 logits and sampling scratch of one sequence
    rope_bytes_per_position: int  # the cos and sin table rows of one position
    max_positions: int  # the context the model was trained for
    dtype: str  # compute dtype name, for the plan's rendering
    scratch_bytes: int = 0  # a fixed kernel scratch of a prefill pass (packed layers decoded for the GEMM)
    scratch_max_bytes: int = 0  # the largest such scratch that helps: the planner grows it into spare VRAM
    dtype_bytes: int = 2  # bytes of one compute-dtype element (the host lane's fp32 KV is counted against it)

    def __post_init__(self) -> None:
        kinds = [m.kind for m in self.modules]
        assert kinds.count("embedding") == kinds.count("norm") == kinds.count("lm_head") == 1, kinds
        assert self.rows > 0 and all(m.bytes >= 0 and m.file_bytes >= 0 for m in self.modules)

    def only(self, kind: ModuleKind) -> Module:
        """The embedding, the final norm or lm_head."""
        return next(m for m in self.modules if m.kind == kind)

    @property
    def layers(self) -> tuple[Module, ...]:
        """The decoder layers, in order."""
        return tuple(m for m in self.modules if m.kind == "layer")

    def kv_bytes(self, batch: int, max_context: int) -> int:
        """The KV cache of ``batch`` sequences of ``max_context`` positions."""
        return self.kv_bytes_per_token * batch * max_context

    def prefill_state_bytes(self, batch: int, max_context: int, prefill_chunk: int, on_host: bool = False) -> int:
        """The VRAM that holds prompt states besides the chunk being computed in a layer-major prefill.
        In VRAM: the hidden states of the longest prompts beyond that chunk wait there while a layer's
        weights serve them all. ``on_host`` (they wait in pinned host memory): two chunk-sized staging
        buffers' worth besides it, one chunk being copied in and one being copied out, whenever a prompt can
        have more than one chunk (``engine.prefill_states.HostStates`` holds exactly that; a prompt of one
        chunk holds nothing besides it). Where the prompt's other chunks are smaller than that, VRAM holds less."""
        in_vram = max(0, batch * (max_context - 1) - max(prefill_chunk, batch)) * self.state_bytes_per_token
        if not on_host:
            return in_vram
        extra = 2 * (HOST_STATE_RING - 1)  # chunks in flight: being copied in, and out
        return extra * max(prefill_chunk, batch) * self.state_bytes_per_token if in_vram else 0

    def prefill_state_host_bytes(self, batch: int, max_context: int) -> int:
        """Host memory for the prompt states of ``batch`` prompts of up to ``max_context`` tokens, when a
        layer-major prefill keeps them there between layers."""
        return batch * max_context * self.state_bytes_per_token

    def workspace_bytes(self, batch: int, max_context: int, prefill_chunk: int, on_host: bool = False) -> int:
        """Activations of one prefill chunk of ``prefill_chunk`` tokens (a decode step is ``batch``
        tokens), the prompt states in VRAM (``prefill_state_bytes``), logits of ``batch`` sequences, rope
        tables for ``max_context``, the kernels' scratch and allocator slack."""
        tokens = max(prefill_chunk, batch)
        return (tokens * self.act_bytes_per_token
                + self.prefill_state_bytes(batch, max_context, prefill_chunk, on_host)
                + batch * self.logits_bytes_per_seq + max_context * self.rope_bytes_per_position
                + self.scratch_bytes + ALLOCATOR_ALLOWANCE)
