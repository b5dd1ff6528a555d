"""Layer-major prefill: every streamed layer crosses once per prompt, whatever the chunk count.

The prompts run in chunks of ``--prefill-chunk`` tokens, but each layer's weights are fetched once
and all chunks go through them before the next layer. Checked on the CPU (fp32, torch kernels)
against the chunk-major order (the whole model per chunk, ``Model.forward``) and against one pass
with every layer resident, for resident, pinned and disk-tier plans, batch 1 and mixed lengths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.footprint import min_budget
from engine.generate import generate, prefill
from engine.sampling import SamplingParams
from tests.helpers import i32, make_engine, make_hf_model, random_prompts, rel_max_err

CHUNK = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("layer_major"), tokenizer_dir=tokenizer_dir)
    return d


def _engine(model_dir: Path, tier: str, batch: int, chunk: int = CHUNK):
    if tier == "resident":
        return make_engine(model_dir, batch=batch, prefill_chunk=chunk)
    probe = make_engine(model_dir, batch=batch)
    low = min_budget(probe.cfg, torch.float32, batch=batch, max_context=64, prefill_chunk=chunk)
    layer = probe.plan.layer_bytes
    probe.close()
    host = {"pinned": 1 << 30, "disk": layer}[tier]  # disk: one layer pinned, the rest read from the files
    return make_engine(model_dir, batch=batch, prefill_chunk=chunk, vram_budget=low, host_budget=host)


def _chunk_major(engine, prompts: list[list[int]], chunk: int) -> torch.Tensor:
    """The order before layer-major: the whole model (and lm_head) once per chunk."""
    b, lens = len(prompts), [len(p) for p in prompts]
    ids = torch.zeros((b, max(lens)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    last = torch.empty(b, engine.cfg.vocab_size)
    engine.cache.reset()
    for c0 in range(0, max(lens), chunk):
        c1 = min(max(lens), c0 + chunk)
        q = [max(0, min(n, c1) - c0) for n in lens]
        logits = engine.model.forward(ids[:, c0:c1], i32([c0] * b), i32(q), engine.cache, max_len=c1)
        for r, n in enumerate(lens):
            if c0 < n <= c1:
                last[r] = logits[r]
    return last


@pytest.mark.parametrize("lengths", [[13], [3, 13, 7]], ids=["batch1", "mixed"])
@pytest.mark.parametrize("tier", ["resident", "pinned", "disk"])
def test_layer_major_equals_chunk_major_and_resident(model_dir, tier, lengths):
    b = len(lengths)
    ref = make_engine(model_dir, batch=b)  # every layer resident, one pass
    ours = _engine(model_dir, tier, b)
    if tier != "resident":
        assert ours.plan.streamed_layers and (tier != "disk" or ours.plan.disk_layers)
    prompts = random_prompts(lengths, ref.cfg.vocab_size, seed=7 + b)
    want = prefill(ref, prompts)
    ref.cache.reset()
    assert rel_max_err(prefill(ours, prompts), want) <= 1e-5
    assert rel_max_err(_chunk_major(ours, prompts, max(1, CHUNK // b)), want) <= 1e-5
    tokens = generate(ref, prompts, SamplingParams(), max_new_tokens=6).token_ids
    assert generate(ours, prompts, SamplingParams(), max_new_tokens=6).token_ids == tokens
    ref.close()
    ours.close()


@pytest.mark.parametrize("tier", ["pinned", "disk"])
def test_each_streamed_layer_crosses_once_per_prompt(model_dir, tier):
    eng = _engine(model_dir, tier, batch=1)
    one_pass = sum(u.nbytes for u in eng.weights.units)
    prompt = random_prompts([15], eng.cfg.vocab_size, seed=3)  # 4 chunks of 4 tokens
    stats = generate(eng, prompt, SamplingParams(), max_new_tokens=5).stats
    assert stats["prefill_streamed_bytes"] == one_pass
    assert stats["decode_streamed_bytes_per_step"] == one_pass
    before = eng.weights.stream.streamed_bytes
    _chunk_major(eng, prompt, CHUNK)  # the old order streams every layer once per chunk
    assert eng.weights.stream.streamed_bytes - before == 4 * one_pass
    eng.close()


def test_resident_run_streams_nothing(model_dir):
    eng = _engine(model_dir, "resident", batch=1)
    stats = generate(eng, random_prompts([9], eng.cfg.vocab_size, seed=4), SamplingParams(), max_new_tokens=3).stats
    assert stats["prefill_streamed_bytes"] == stats["decode_streamed_bytes_per_step"] == 0
    eng.close()
