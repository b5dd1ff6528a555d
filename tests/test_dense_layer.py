"""A layer's packed weights widened once for all the units of a prompt pass (engine/dense_layer.py): the logits of
the pass that widens each projection per unit, each projection widened once a layer, and nothing kept after the
pass. The Triton kernels run in the interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV  # (sets TRITON_INTERPRET first)

from engine import head_ahead  # noqa: E402
from engine.dense_layer import layer_bytes  # noqa: E402
from engine.model import Group  # noqa: E402
from tests.helpers import make_engine, random_prompts  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.synth.writer import synthesize
    return synthesize("tiny-qwen2", tmp_path_factory.mktemp("dense") / "awq", dtype="bf16", seed=7, quant="awq")


def _groups(vocab: int) -> list[Group]:
    """Three prompts from position 0 (rows 0-2): three units of stacks of at most 16 rows."""
    i32 = dict(dtype=torch.int32, device=DEV)
    return [Group(torch.tensor([p], device=DEV), torch.zeros(1, **i32), torch.tensor([len(p)], **i32), row, len(p))
            for row, p in enumerate(random_prompts([13, 11, 9], vocab, seed=4))]


def _fitting(cfg, left: int) -> int:
    """How many of a layer's projections (in order: q/k/v, o, gate/up, down) the cache widens in ``left`` bytes
    (new allocations)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    sizes = [(cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d * h, h * h, 2 * i * h, i * h]
    n = 0
    for size in (x * 4 for x in sizes):  # fp32
        if size > left:
            break  # the first that does not fit leaves the rest of the layer to the tiled path
        left, n = left - size, n + 1
    return n


@pytest.mark.parametrize("room", ["whole", "part"])
def test_each_projection_is_widened_once_a_layer(model_dir, monkeypatch, room):
    eng = make_engine(model_dir, kernels="triton", device=DEV, batch=3, max_context=64, prefill_chunk=16)
    try:
        n = eng.cfg.num_hidden_layers
        monkeypatch.setattr(eng.ops, "_dense_min_m", 1)  # the tiny units' rows take the dense path
        groups, pick = _groups(eng.cfg.vocab_size), [(0, 0, 12), (1, 0, 10), (2, 0, 8)]
        whole = layer_bytes(eng.cfg, eng.model.dtype.itemsize)
        outs = []
        for on in (False, True):
            monkeypatch.setenv("LAYERSTREAM_DENSE_LAYER", "1" if on else "0")
            # "part": room for the layer in the split, but the cache then finds room for all but the largest
            monkeypatch.setattr(head_ahead, "room", lambda *a: whole)
            if room == "part":
                monkeypatch.setattr("engine.dense_layer.layer_bytes", lambda cfg, itemsize: whole // 2)
            before = eng.ops.dense_widened
            outs.append(eng.model.forward_groups(groups, eng.cache, pick, stack_rows=16))
            widened = eng.ops.dense_widened - before
            # q/k/v, o, gate/up and down: 4 packed weights a layer, widened once for the 3 units (not 3 times); in
            # half the room, those that fit in the order the layer applies them
            assert widened == (0 if not on else 4 * n if room == "whole" else _fitting(eng.cfg, whole // 2) * n)
        assert eng.ops._dense is None  # noqa: SLF001  (nothing kept after the layer)
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    finally:
        eng.close()


def test_the_widened_weights_can_wait_in_free_kv_rows(model_dir, monkeypatch):
    """The layer's widened weights in a slot cache's free rows (3-8), several row tiles a weight, a GEMM each
    (ops._tiles_linear): the logits and the running rows' keys of the pass that widens per unit."""
    eng = make_engine(model_dir, kernels="triton", device=DEV, batch=9, max_context=64, prefill_chunk=16)
    try:
        n = eng.cfg.num_hidden_layers
        monkeypatch.setattr(eng.ops, "_dense_min_m", 1)
        monkeypatch.setattr(head_ahead, "room", lambda *a: 0)  # no new allocation: the free rows only
        groups, pick = _groups(eng.cfg.vocab_size), [(0, 0, 12), (1, 0, 10), (2, 0, 8)]
        tiles = []
        real = eng.ops._tiles_linear  # noqa: SLF001
        monkeypatch.setattr(eng.ops, "_tiles_linear", lambda x, t, *a: tiles.append(len(t)) or real(x, t, *a))
        outs, kv = [], []
        for on in (False, True):
            monkeypatch.setenv("LAYERSTREAM_DENSE_LAYER", "1" if on else "0")
            before = eng.ops.dense_widened
            outs.append(eng.model.forward_groups(groups, eng.cache, pick, stack_rows=16, spare_rows=[3, 4, 5, 6, 7, 8]))
            kv.append([c[:, :3].clone() for c in (eng.cache.k, eng.cache.v)])
            assert eng.ops.dense_widened - before == (4 * n if on else 0)
        assert max(tiles) > 1  # a weight across several rows' spans
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
        for got, want in zip(kv[1], kv[0]):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    finally:
        eng.close()
