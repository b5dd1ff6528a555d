"""The sizes the planner works with: a footprint and a workload turned into bytes (plain numbers)."""

from __future__ import annotations

from dataclasses import dataclass

from memory.footprint import Footprint


@dataclass(frozen=True)
class Sizes:
    layer: int  # the largest packed layer: one staging slot, and what each residency decision costs
    layers: tuple[int, ...]  # each layer's packed bytes
    layer_file: tuple[int, ...]  # each layer's bytes in the checkpoint files
    embed: int
    lm_head: int  # == embed when tied (the same tensor)
    norm: int
    row: int  # one embedding / lm_head row
    row_file: int
    lm_head_file: int
    kv: int
    workspace: int
    state: int  # the part of workspace holding a long prompt's other chunks (in flight only, with host states)
    state_host: int  # host memory holding the prompt states between layers (0: they wait in VRAM)
    tied: bool

    @property
    def fixed(self) -> int:
        return self.kv + self.workspace + self.norm

    @property
    def n(self) -> int:
        return len(self.layers)


def sizes(fp: Footprint, batch: int, max_context: int, prefill_chunk: int, host_states: bool = False) -> Sizes:
    """Every size the planner needs, from the model's footprint and the workload; ``host_states``: a
    layer-major prefill keeps the prompt states in host memory between layers."""
    layers, embed, head = fp.layers, fp.only("embedding"), fp.only("lm_head")
    return Sizes(layer=max((m.bytes for m in layers), default=0), layers=tuple(m.bytes for m in layers),
                  layer_file=tuple(m.file_bytes for m in layers), embed=embed.bytes, lm_head=head.bytes,
                  norm=fp.only("norm").bytes, row=embed.bytes // fp.rows, row_file=embed.file_bytes // fp.rows,
                  lm_head_file=head.file_bytes, kv=fp.kv_bytes(batch, max_context),
                  workspace=fp.workspace_bytes(batch, max_context, prefill_chunk, host_states),
                  state=fp.prefill_state_bytes(batch, max_context, prefill_chunk, host_states),
                  state_host=fp.prefill_state_host_bytes(batch, max_context) if host_states else 0, tied=fp.tied)


def all_resident_bytes(s: Sizes) -> int:
    return s.fixed + sum(s.layers) + s.embed + (0 if s.tied else s.lm_head)


def minimum_bytes(s: Sizes) -> int:
    return min(all_resident_bytes(s), s.fixed + 2 * s.layer)
