"""A served pass's decode group through the decode step's graphs (engine/graph_unit.py).

On the CPU: where each of the decode graph's steps is replayed in a pass (``due_steps``), for the real schedule
(``DecodeGraph._schedule``) of resident and streamed layers in every arrangement: every layer once, in order, a
streamed layer at its own layer, a resident one no later than its own. On CUDA (tests/test_gpu_graph_unit.py):
the scheduler's tokens with the unit and without.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from engine.graph_unit import due_steps
from engine.graphs import DecodeGraph


def _graph(resident: set[int], n: int, head_in_graph: bool) -> DecodeGraph:
    """A DecodeGraph's schedule without CUDA: each fixed piece's callables name their layers."""
    g = object.__new__(DecodeGraph)
    g.model = SimpleNamespace(host=None, cfg=SimpleNamespace(num_hidden_layers=n))
    g.weights = SimpleNamespace(resident={i: None for i in resident})
    g.head_in_graph = head_in_graph
    g._start = "start"
    g._head = "head"
    g._layers_fn = lambda layers, weights_of=None: layers
    g.steps = [(k, w if k == "fixed" else (w, None)) for k, w in g._schedule()]
    return g


def _arrangements(n: int):
    for bits in itertools.product([0, 1], repeat=n):
        yield {i for i, b in enumerate(bits) if b}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("head_in_graph", [False, True])
def test_every_layer_replayed_once_in_order_and_never_late(n, head_in_graph):
    for resident in _arrangements(n):
        g = _graph(resident, n, head_in_graph)
        due = due_steps(g)
        ran, started = [], False
        for i in range(n):
            for kind, what in due.get(i, ()):
                if kind == "streamed":
                    assert what[0] == i and i not in resident
                    ran.append(i)
                    continue
                for piece in what:
                    if piece == "start":
                        assert not ran, "the step's start after a layer"
                        started = True
                    elif piece != "head":
                        assert all(j >= i for j in piece), f"{resident}: layers {piece} replayed at {i}"
                        ran += list(piece)
        assert started and ran == list(range(n)), (resident, ran)


def test_a_last_head_only_piece_is_left_out():
    g = _graph({0}, 2, head_in_graph=True)  # layer 1 streamed: the head's piece alone after it
    assert g.steps[-1] == ("fixed", ["head"])
    placed = [step for steps in due_steps(g).values() for step in steps]
    assert ("fixed", ["head"]) not in placed
