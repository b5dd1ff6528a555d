"""A served pass's decode group through the decode step's CUDA graphs (``engine.graphs``), beside its prompts.

A pass that feeds prompts next to decoding sequences (``Model.forward_groups``) runs the decoding rows as their own
unit, ahead of the prompt units on every layer. Launched eagerly that unit costs each layer a norm, the
projections, RoPE and the KV append, attention and the MLP's launches from Python; on a host-bound streamed pass
they add to the prompt's own. Session 50's served steady load (16 clients, synthetic 7B AWQ at 6 GiB on an H100)
had its prompt passes beside 15 decoding rows at a median of 144-151 ms against 100-104 ms for a prompt alone.

The decode step's graphs already hold those launches: one graph per run of resident layers and one per streamed
layer and staging slot, over static hidden-state buffers. Here the decode unit replays them at its layers: a
resident run's graph when the pass reaches the run's first layer (its layers touch only the decode rows' KV and
the static buffers, so running them ahead of the prompt units' same layers changes nothing), a streamed layer's
graph for the slot that holds the layer now. The graphs compute every slot row (the batch they were captured at):
a row that is not decoding writes one padding key at its sequence's next position (``start``), which a prompt of
that row writes over later in the same layer, or at position 0 of a free row, as the pure decode step does. So
the pass must not lend free rows (``engine.head_ahead``) or park states in rows' tails (host prompt states): the
runner uses a graph unit only where neither happens. On by default (``LAYERSTREAM_GRAPH_UNIT=0``: eager): session
53's H100 ran the 7B AWQ's mixed pass in process at 85 ms against 97 ms eagerly, served prompt passes beside 15
decoding rows at 103-114 ms against 149-153 ms (bench/results/2026-12-07-h100-s53/call1/).
"""

from __future__ import annotations

import torch

from engine.graphs import DecodeGraph, slot_graph


class GraphUnit:
    """The decode rows ``0 .. rows-1`` of one pass, run by ``graph``'s replays at each layer (``layer``)."""

    def __init__(self, graph: DecodeGraph, tok: list[int], start: list[int], rows: int) -> None:
        """``tok`` / ``start``: every graph row's token and next position (a row that is not decoding: its
        sequence's next position, 0 where free); ``rows``: the decode group's rows, the unit's states."""
        assert graph.model.host is None, "a host lane's layers run between the graphs, not in a pass's units"
        assert len(tok) == len(start) == graph.batch and 0 < rows <= graph.batch
        self.graph, self.rows = graph, rows
        self.due = due_steps(graph)
        graph.stage(torch.tensor(tok, dtype=torch.long), torch.tensor(start, dtype=torch.int32))

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit's hidden states and residual [rows, 1, H] (views of the graph's static buffers)."""
        return self.graph.h[: self.rows], self.graph.res[: self.rows]

    def layer(self, i: int, w: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay what is due at layer i (``w``: the layer's weights as the pass got them, a streamed layer's
        naming its staging slot); the unit's states after it."""
        for kind, what in self.due.get(i, ()):
            if kind == "fixed":
                what.replay()
            else:
                slot_graph(what[1], w).replay()
        return self.states()


def due_steps(graph: DecodeGraph) -> dict[int, list[tuple[str, object]]]:
    """The graph's steps by the layer at which a pass's decode unit replays them: a resident run's piece (with the
    step's start, positions and embedding when it leads) at the run's first layer, a piece that holds no layer
    (the start alone) with the streamed layer after it, a streamed layer's graphs at that layer. A last piece of
    only the lm_head is left out (the pass computes its logits itself)."""
    resident, steps, k = graph.weights.resident, graph.steps, 0
    due: dict[int, list[tuple[str, object]]] = {}
    for i in range(graph.model.cfg.num_hidden_layers):
        if k < len(steps) and steps[k][0] == "fixed":  # a run starting here, or the start before a streamed layer
            due.setdefault(i, []).append(steps[k])
            k += 1
        if i in resident:
            continue
        assert k < len(steps) and steps[k][0] == "streamed" and steps[k][1][0] == i, f"layer {i}: {steps[k:k + 1]}"
        due.setdefault(i, []).append(steps[k])
        k += 1
    assert k == len(steps) or (k == len(steps) - 1 and graph.head_in_graph), "graph steps left unplaced"
    return due
