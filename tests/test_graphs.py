"""The decode step in graph pieces (engine.graphs), checked on the CPU.

A CUDA graph replays the kernels its capture recorded. Here each "graph" replays the
Python that was captured instead, which exercises everything the pieces add on top of
an eager step: the schedule of resident runs and streamed layers, the static buffers
that carry the hidden state between pieces, picking a streamed layer's piece by the slot
the streamer filled, and the order of the streamer's waits and frees. The GPU half
(real capture under the VRAM cap) is in tests/test_gpu_stream.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kv_cache import KVCache
from tests.helpers import CpuDecodeGraph, forward_decode, forward_prefill, i32, load_ours, make_hf_model

MAX_CONTEXT = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("graphs"))
    return d


def _decode_eager_and_graph(model_dir: Path, plan: str, batch: int, steps: int = 4):
    runs = []
    for use_graph in (False, True):
        ours = load_ours(model_dir, plan=plan, batch=batch, max_context=MAX_CONTEXT)
        cache = KVCache(ours.cfg, batch, MAX_CONTEXT, torch.float32, "cpu")
        graph = CpuDecodeGraph(ours.model, cache, batch) if use_graph else None
        ids = torch.randint(0, ours.cfg.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(1))
        logits = forward_prefill(ours.model, cache, ids, last_only=True)
        out = []
        for pos in range(5, 5 + steps):
            tok = logits.argmax(-1)
            if graph is None:
                logits = forward_decode(ours.model, cache, tok, pos)
            else:
                logits = graph(tok, i32([pos] * batch)).clone()
            out.append(logits)
        runs.append((torch.stack(out), ours, graph))
    return runs


@pytest.mark.parametrize("plan", ["resident", "stream-partial", "stream-all", "disk-some"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_pieces_equal_eager_steps(model_dir, plan, batch):
    (eager, _, _), (graphed, ours, graph) = _decode_eager_and_graph(model_dir, plan, batch)
    err = ((graphed - eager).abs().max() / eager.abs().max()).item()
    assert err < 1e-5, f"graph pieces differ from eager decode by {err:.2e}"
    streamed = len(ours.plan.streamed_layers)
    n_slots = len(ours.weights.stream.slots)
    # one piece per staging slot for each streamed layer; the resident runs, start and head in the rest
    pieces = [w for k, w in graph.steps if k == "streamed"]
    assert len(pieces) == streamed
    assert all(len(per_slot) == n_slots for _, per_slot in pieces)
    assert len(graph.captured) == len(graph.steps) - streamed + streamed * n_slots
    assert 0 not in graph.captured, "an empty graph was captured (two streamed layers in a row)"


def test_all_resident_is_one_graph(model_dir):
    graph = _decode_eager_and_graph(model_dir, "resident", 1, steps=1)[1][2]
    assert [k for k, _ in graph.steps] == ["fixed"]
    assert graph.captured == [3]  # start (positions + embedding), every layer, head


def test_streamed_layer_replays_the_piece_of_its_slot(model_dir):
    """Consecutive passes put a layer in different slots: each replay must read that slot."""
    ours = load_ours(model_dir, plan="stream-all", batch=1, max_context=MAX_CONTEXT)
    cache = KVCache(ours.cfg, 1, MAX_CONTEXT, torch.float32, "cpu")
    graph = CpuDecodeGraph(ours.model, cache, 1)
    used: list[int] = []
    for _, (i, per_slot) in (s for s in graph.steps if s[0] == "streamed"):
        for ptr, piece in per_slot.items():
            fns = piece.fns

            def spy(ptr=ptr, fns=fns):
                used.append(ptr)
                for fn in fns:
                    fn()
            piece.fns = [spy]
    tok = torch.zeros(1, dtype=torch.long)
    for pos in range(3):
        graph(tok, i32([pos]))
    slot_ptrs = [ours.weights.slot_layer(s, 0)["self_attn.qkv_proj.weight"].data_ptr()
                 for s in range(len(ours.weights.stream.slots))]
    units = len(ours.weights.units)
    # unit g of the endless sequence sits in slot g % slots; lm_head chunks are units too
    expected = [slot_ptrs[g % len(slot_ptrs)] for p in range(3) for g in range(p * units, p * units + units)
                if ours.weights.units[g % units].name.startswith("layer.")]
    assert used == expected


def test_slot_address_of_plain_and_packed_weights():
    """A slot's piece is keyed by where its qkv weight lives, whatever form the weight takes."""
    from engine.graphs import slot_address
    from engine.quant.ggml import GGMLWeight
    from engine.quant.spec import QuantWeight

    buf = torch.zeros(4096, dtype=torch.uint8)
    plain = buf[64:128]
    packed = QuantWeight(buf[256:512].view(torch.int32).view(8, 8), torch.ones(8, 1), None, None, None, 64)
    blocks = GGMLWeight((("q4_k", buf[1024:2048].view(4, 256)), ("q6_k", buf[2048:2560].view(2, 256))), 256)
    assert slot_address(plain) == buf.data_ptr() + 64
    assert slot_address(packed) == buf.data_ptr() + 256
    assert slot_address(blocks) == buf.data_ptr() + 1024
