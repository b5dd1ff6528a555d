"""Host prompt states parked in the KV cache's unreached positions (engine.state_parking).

A plan that puts the prompt states in host memory parks a prompt's states in the contiguous cache's
positions past its end when they fit: the same logits and tokens as the states in host memory, in VRAM
and all resident, and nothing copied to the host; a prompt that leaves too little room uses host memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.state_parking as parking
from engine.config import ModelConfig
from engine.generate import generate, prefill
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from tests.helpers import make_engine, make_hf_model, random_prompts, rel_max_err
from tests.test_prefill_host_states import _engine, _moved


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("parking"), tokenizer_dir=tokenizer_dir)
    return d


def _cache(rows: int = 3, context: int = 40) -> KVCache:
    cfg = ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "vocab_size": 100, "max_position_embeddings": 128})
    return KVCache(cfg, rows, context, torch.float32, "cpu")


def test_tail_spans_are_exactly_the_unreached_positions_of_the_named_rows(monkeypatch):
    monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 1)
    cache = _cache()
    spans = parking.kv_tail_spans(cache, {0: 10, 2: 39})  # row 1 is left alone (another sequence's)
    layers, _, heads, positions, dim = cache.k.shape
    assert len(spans) == 2 * 2 * layers * heads  # keys and values, two rows, every layer and head
    for s in spans:
        s.fill_(7.0)
    marked = (cache.k == 7.0) & (cache.v == 7.0)
    assert marked[:, 0, :, 10:].all() and not marked[:, 0, :, :10].any()
    assert marked[:, 2, :, 39:].all() and not marked[:, 2, :, :39].any()
    assert not marked[:, 1].any()
    monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 2 * dim)  # row 2's one-position tails are too short
    assert len(parking.kv_tail_spans(cache, {0: 10, 2: 39})) == 2 * layers * heads


def test_parking_carves_buffers_across_spans_and_pairs_cover_them():
    spans = [torch.zeros(5), torch.zeros(12), torch.zeros(7)]
    park = parking.Parking(spans)
    assert park.fits([10, 14], torch.float32) and not park.fits([10, 15], torch.float32)
    assert not park.fits([1], torch.bfloat16)
    a, b = park.take(10), park.take(14)
    assert [p.numel() for p in a] == [10] and [p.numel() for p in b] == [2, 7, 5]
    assert park.free == 0
    x = torch.arange(14.0).view(2, 7)
    for dst, src in parking.pairs(b, x):  # out: the tensor into its pieces
        dst.copy_(src)
    y = torch.empty(2, 7)
    for dst, src in parking.pairs(y, b):  # in: the pieces back into a tensor
        dst.copy_(src)
    assert torch.equal(x, y)
    assert parking.pairs(y, x) == [(y, x)]


@pytest.mark.parametrize("lengths", [[13], [3, 13, 7]], ids=["batch1", "mixed"])
@pytest.mark.parametrize("tier", ["resident", "pinned", "disk"])
def test_parked_states_equal_host_and_resident(model_dir, tier, lengths, monkeypatch):
    b = len(lengths)
    ref = make_engine(model_dir, batch=b)
    runs = {}
    for park in ("0", "1"):
        monkeypatch.setenv("LAYERSTREAM_PARK_STATES", park)
        monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 1)  # the tiny model's tails are short
        eng = _engine(model_dir, tier, b, "host")
        assert eng.model.host_states
        prompts = random_prompts(lengths, ref.cfg.vocab_size, seed=21 + b)
        logits = prefill(eng, prompts)
        run = generate(eng, prompts, SamplingParams(), max_new_tokens=6)
        runs[park] = logits, run.token_ids, run.stats["prefill_state_host_bytes"], eng.model.parked_passes
        eng.close()
    assert runs["1"][3] == 2 and runs["0"][3] == 0  # prefill and generate's prefill parked
    assert runs["1"][2] == 0 and runs["0"][2] == _moved(ref, lengths)
    assert torch.equal(runs["1"][0], runs["0"][0])  # the same arithmetic, only where the states wait differs
    assert rel_max_err(runs["1"][0], prefill(ref, random_prompts(lengths, ref.cfg.vocab_size, seed=21 + b))) <= 1e-5
    assert runs["1"][1] == runs["0"][1] == generate(ref, random_prompts(lengths, ref.cfg.vocab_size, seed=21 + b),
                                                    SamplingParams(), max_new_tokens=6).token_ids
    ref.close()


def test_a_prompt_that_leaves_no_room_waits_in_host_memory(model_dir, monkeypatch):
    monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 1)
    eng = _engine(model_dir, "pinned", 1, "host")
    cfg = eng.cfg
    long = eng.opts.max_context - 2  # two positions left per head: less than the states need
    run = generate(eng, random_prompts([long], cfg.vocab_size, seed=3), SamplingParams(), max_new_tokens=1)
    assert eng.model.parked_passes == 0 and run.stats["prefill_state_host_bytes"] == _moved(eng, [long])
    short = generate(eng, random_prompts([9], cfg.vocab_size, seed=3), SamplingParams(), max_new_tokens=1)
    assert eng.model.parked_passes == 1 and short.stats["prefill_state_host_bytes"] == 0
    eng.close()
