"""Our decoder (Checkpoint + ModelWeights + Model, fp32 on the CPU) against transformers.

For each family (Qwen2, Qwen2 tied, Qwen3 with head_dim != hidden / heads, Llama, Llama with
llama3 rope scaling, Mistral, Llama with one KV head) a tiny random model is built with
transformers, saved as safetensors and loaded by our engine. Checked:

* prefill logits at every position and every decode step with the KV cache (teacher forced)
  against transformers' full-sequence logits: max |diff| <= 1e-4 * max |ref|;
* 32 greedy tokens through ``engine.generate.generate`` == ``model.generate(do_sample=False)``;
* a batch of 3 prompts of different lengths == each prompt alone;
* streaming plans (layers and lm_head through staging slots, pinned or from disk) == all resident;
* chunked prefill == one-pass prefill; greedy with the KV cache == greedy re-running the sequence;
* the Triton kernels (interpreted on the CPU) on one family, with a looser tolerance.
"""

from __future__ import annotations

import pytest
import torch

from engine.generate import generate, prefill
from engine.kv_cache import KVCache
from engine.ops import TorchOps
from engine.sampling import SamplingParams
from tests.helpers import (FAMILIES, forward_decode, forward_prefill, greedy_cached, greedy_no_cache, hf_greedy, i32,
                           load_ours, make_engine, make_hf_model, random_prompts, rel_max_err)

TOL = 1e-4  # fp32, torch kernels: relative to max |ref logits|
TRITON_TOL = 1e-3


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer_dir):
    """``hf(family, legacy=False) -> (transformers model, model dir)``, built once per module."""
    built = {}

    def get(family: str, legacy: bool = False):
        key = (family, legacy)
        if key not in built:
            built[key] = make_hf_model(family, tmp_path_factory.mktemp("hf"), tokenizer_dir=tokenizer_dir,
                                       seed=100 + FAMILIES.index(family), legacy=legacy)
        return built[key]

    return get


# ------------------------------------------------------------------------------ logits

@pytest.mark.parametrize("layout", ["transformers5", "legacy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_transformers(hf, family, layout):
    """config.json as transformers 5 writes it (rope_parameters) and in the older layout
    (top-level rope_theta / rope_scaling) must both load to the same model."""
    ref_model, d = hf(family, legacy=layout == "legacy")
    ours = load_ours(d, max_context=32)
    cfg = ours.cfg
    gen = torch.Generator().manual_seed(7 + FAMILIES.index(family))
    b, t0, steps = 2, 7, 9
    ids = torch.randint(0, cfg.vocab_size, (b, t0 + steps), generator=gen)
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    cache = KVCache(cfg, b, 32, torch.float32, "cpu")
    out = forward_prefill(ours.model, cache, ids[:, :t0], last_only=False)
    assert out.shape == (b, t0, cfg.vocab_size) and out.dtype == torch.float32
    err = rel_max_err(out, ref[:, :t0])
    assert err <= TOL, f"{family}/{layout} prefill: max rel err {err:.2e} > {TOL}"
    for t in range(t0, t0 + steps - 1):
        o = forward_decode(ours.model, cache, ids[:, t], t)
        err = rel_max_err(o, ref[:, t])
        assert err <= TOL, f"{family}/{layout} decode at position {t}: max rel err {err:.2e} > {TOL}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(hf, family):
    ref_model, d = hf(family)
    engine = make_engine(d)
    prompt = random_prompts([6], engine.cfg.vocab_size, seed=11 + FAMILIES.index(family))[0]
    want = hf_greedy(ref_model, prompt, 32)
    got = generate(engine, [prompt], SamplingParams(), max_new_tokens=32)
    assert got.finish_reasons == ["max_new_tokens"]
    assert got.token_ids[0] == want, f"{family}: first difference at step " \
        f"{next(i for i, (a, b) in enumerate(zip(got.token_ids[0], want)) if a != b)}"
    engine.close()


# ------------------------------------------------------------------------------ batching

@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_prompt_alone(hf, family):
    _, d = hf(family)
    engine = make_engine(d, batch=3)
    prompts = random_prompts([3, 11, 6], engine.cfg.vocab_size, seed=21 + FAMILIES.index(family))
    batched_logits = prefill(engine, prompts)
    alone_logits = [prefill(engine, [p])[0] for p in prompts]
    for i, ref in enumerate(alone_logits):
        err = rel_max_err(batched_logits[i], ref)
        assert err <= 1e-5, f"{family}: prompt {i} (len {len(prompts[i])}) prefill logits differ in a batch: {err:.2e}"
    batched = generate(engine, prompts, SamplingParams(), max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = generate(engine, [p], SamplingParams(), max_new_tokens=12)
        assert batched.token_ids[i] == alone.token_ids[0], f"{family}: prompt {i} (len {len(p)})"
    engine.close()


def test_batch_rows_finish_independently(hf):
    """A row that stops early (eos) does not disturb the others."""
    _, d = hf("qwen2")
    engine = make_engine(d, batch=2)
    prompts = random_prompts([4, 9], engine.cfg.vocab_size, seed=5)
    alone = [generate(engine, [p], SamplingParams(), max_new_tokens=10).token_ids[0] for p in prompts]
    engine.tokenizer.eos_ids = {alone[0][3]}  # row 0 stops at its 4th token (unless it came earlier)
    stop0 = alone[0].index(alone[0][3])
    out = generate(engine, prompts, SamplingParams(), max_new_tokens=10)
    assert out.token_ids[0] == alone[0][:stop0] and out.finish_reasons[0] == "eos"
    want1 = alone[1][:alone[1].index(alone[0][3])] if alone[0][3] in alone[1] else alone[1]
    assert out.token_ids[1] == want1
    engine.close()


def test_context_cap_stops_each_row_with_length(hf):
    """Rows reaching max_context stop ('length') with the same tokens as an uncapped run; the others go on."""
    _, d = hf("llama")
    cap = 16
    capped, free = make_engine(d, batch=2, max_context=cap), make_engine(d, batch=2, max_context=64)
    prompts = random_prompts([4, 10], capped.cfg.vocab_size, seed=15)
    want = generate(free, prompts, SamplingParams(), max_new_tokens=20).token_ids
    got = generate(capped, prompts, SamplingParams(), max_new_tokens=20)
    assert got.finish_reasons == ["length", "length"]
    for i, p in enumerate(prompts):
        assert len(got.token_ids[i]) == cap - len(p), f"row {i}: {len(got.token_ids[i])} tokens"
        assert got.token_ids[i] == want[i][: cap - len(p)], f"row {i}"
    capped.close()
    free.close()


# ------------------------------------------------------------------------------ streaming

@pytest.mark.parametrize("plan", ["stream-all", "stream-partial", "disk-some", "disk-all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_plan_equals_resident(hf, family, plan):
    _, d = hf(family)
    resident = load_ours(d, plan="resident", batch=2)
    streamed = load_ours(d, plan=plan, batch=2)
    p, n = streamed.plan, streamed.cfg.num_hidden_layers
    assert p.streamed_layers and p.num_slots >= 2, f"plan {plan} does not stream: {p.table()}"
    if plan != "stream-partial":
        assert p.resident_layers == () and not p.lm_head_resident and p.lm_head_chunks >= 2
    if plan == "stream-partial":
        assert p.resident_layers == (n - 1,) and p.streamed_layers == tuple(range(n - 1))  # spread: 0 first
    if plan == "disk-some":
        assert p.disk_layers == tuple(range(1, n))
    if plan == "disk-all":
        assert p.disk_layers == tuple(range(n))
    pinned = sum(b.numel() for b in streamed.weights.stream.host_bufs.values())
    assert pinned <= p.host_budget_bytes, f"{plan}: {pinned} bytes held in host buffers, host budget {p.host_budget_bytes}"
    cfg = resident.cfg
    prompts = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = []
    for ours in (resident, streamed):
        cache = KVCache(cfg, 2, 64, torch.float32, "cpu")
        out = [forward_prefill(ours.model, cache, prompts, last_only=False)]
        tok = out[0][:, -1].argmax(-1)
        for s in range(6):  # several passes: the streamer's unit sequence wraps around
            out.append(forward_decode(ours.model, cache, tok, 9 + s))
            tok = out[-1].argmax(-1)
        logits.append(out)
    for step, (a, b) in enumerate(zip(*logits)):
        err = rel_max_err(b, a)
        assert err <= 1e-6, f"{family}/{plan}: step {step} logits differ from all-resident by {err:.2e}"
    prompt = prompts[0, :5].tolist()
    assert greedy_cached(streamed.model, cfg, prompt, 10) == greedy_cached(resident.model, cfg, prompt, 10)
    streamed.weights.close()


def test_streaming_engine_with_budget_equals_resident(hf):
    """The same through Engine + EngineOptions(vram_budget=..., host_budget=...)."""
    from engine.footprint import min_budget

    _, d = hf("qwen2-tied")
    ref = make_engine(d, batch=2)
    prompts = random_prompts([5, 8], ref.cfg.vocab_size, seed=9)
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=8).token_ids
    low = min_budget(ref.cfg, torch.float32, batch=2, max_context=64, prefill_chunk=2048)
    for host in (1 << 30, 0):
        eng = make_engine(d, batch=2, vram_budget=low, host_budget=host)
        assert eng.plan.streamed_layers and not eng.plan.lm_head_resident
        assert generate(eng, prompts, SamplingParams(), max_new_tokens=8).token_ids == want, f"host_budget={host}"
        eng.close()
    ref.close()


# ------------------------------------------------------------------------------ prefill / cache

@pytest.mark.parametrize("lengths", [[10], [3, 10, 7]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_pass(hf, family, lengths):
    _, d = hf(family)
    b = len(lengths)
    one = make_engine(d, batch=b)
    chunked = make_engine(d, batch=b, prefill_chunk=3)
    prompts = random_prompts(lengths, one.cfg.vocab_size, seed=31 + FAMILIES.index(family))
    err = rel_max_err(prefill(chunked, prompts), prefill(one, prompts))
    assert err <= 1e-5, f"{family}: chunked prefill logits differ by {err:.2e}"
    a = generate(one, prompts, SamplingParams(), max_new_tokens=10).token_ids
    c = generate(chunked, prompts, SamplingParams(), max_new_tokens=10).token_ids
    assert c == a
    one.close()
    chunked.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_equals_recompute(hf, family):
    _, d = hf(family)
    ours = load_ours(d)
    prompt = random_prompts([5], ours.cfg.vocab_size, seed=41 + FAMILIES.index(family))[0]
    assert greedy_cached(ours.model, ours.cfg, prompt, 16) == greedy_no_cache(ours.model, ours.cfg, prompt, 16)


# ------------------------------------------------------------------------------ Triton kernels

TRITON_FAMILY = "qwen3"  # q/k norms and head_dim * heads != hidden: the most kernel paths


def _triton_ops():
    from engine.ops_triton import TritonOps

    return TritonOps()


def test_triton_ops_parity_and_greedy(hf):
    ops = _triton_ops()
    ref_model, d = hf(TRITON_FAMILY)
    ours = load_ours(d, ops=ops, max_context=32)
    cfg = ours.cfg
    prompt = random_prompts([6], cfg.vocab_size, seed=51)[0]
    want = hf_greedy(ref_model, prompt, 8)
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt + want])).logits.float()[0]
    cache = KVCache(cfg, 1, 32, torch.float32, "cpu")
    logits = forward_prefill(ours.model, cache, torch.tensor([prompt]), last_only=False)[0]
    err = rel_max_err(logits, ref[:6])
    assert err <= TRITON_TOL, f"triton prefill: max rel err {err:.2e}"
    got = []
    for s in range(8):
        tok = logits[-1].argmax(-1) if logits.dim() == 2 else logits.argmax(-1)
        got.append(int(tok))
        if s == 7:
            break
        logits = forward_decode(ours.model, cache, tok.view(1), 6 + s)[0]
        err = rel_max_err(logits, ref[6 + s])
        assert err <= TRITON_TOL, f"triton decode at position {6 + s}: max rel err {err:.2e}"
    assert got == want


def test_triton_padded_batch_equals_torch(hf):
    """Right-padded batched prefill (q_lens < T) and decode at different positions through the kernels."""
    ops = _triton_ops()
    _, d = hf(TRITON_FAMILY)
    tri, ref = load_ours(d, ops=ops, batch=2, max_context=32), load_ours(d, ops=TorchOps(), batch=2, max_context=32)
    cfg = ref.cfg
    prompts = random_prompts([3, 7], cfg.vocab_size, seed=61)
    ids = torch.zeros((2, 7), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    outs = []
    for ours in (ref, tri):
        cache = KVCache(cfg, 2, 32, torch.float32, "cpu")
        logits = ours.model.forward(ids, i32([0, 0]), i32([3, 7]), cache, 7)
        steps = [logits]
        pos = [3, 7]
        for _ in range(3):
            tok = steps[-1].argmax(-1)
            steps.append(ours.model.forward(tok.view(2, 1), i32(pos), i32([1, 1]), cache, max(pos) + 1))
            pos = [p + 1 for p in pos]
        outs.append(steps)
    for step, (a, b) in enumerate(zip(*outs)):
        err = rel_max_err(b, a)
        assert err <= TRITON_TOL, f"triton vs torch, padded batch, step {step}: max rel err {err:.2e}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"
