"""A decode step's host-table embedding gathered into a (pinned) host buffer equals ``embed``'s rows."""

from __future__ import annotations

import pytest
import torch

from engine.footprint import min_budget
from tests.helpers import make_engine


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_embed_into_matches_embed(tiny_qwen2_dir, dtype):
    probe = make_engine(tiny_qwen2_dir)
    probe.close()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    low = min_budget(probe.cfg, dt, max_context=64, prefill_chunk=2048)
    eng = make_engine(tiny_qwen2_dir, vram_budget=low, dtype=dtype)  # the table stays on the host
    assert not eng.plan.embed_on_device
    ids = torch.tensor([[3], [0], [eng.cfg.vocab_size - 1], [3]])
    out = torch.full((4, 1, eng.cfg.hidden_size), float("nan"), dtype=eng.dtype)
    eng.weights.embed_into(ids, out)
    assert torch.equal(out, eng.weights.embed(ids).cpu())
    eng.close()
