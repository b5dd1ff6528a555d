"""Tests for the RoPE kernel (kernels/rope.py): in-place rotation of q/k views, its first-call
tuner and the cos/sin tables, against the fp32 references and transformers."""
from __future__ import annotations

import pytest
import torch
import triton

from tests.kernel_utils import BT, DEV, DTYPES, GQA_HEADS, INTERPRET, close, cuda_only, qkv_views, rand  # noqa: F401  (sets TRITON_INTERPRET first)

from kernels.kv_append import kv_append_, kv_append_ref  # noqa: E402
from kernels.rope import apply_rope_, apply_rope_ref, rope_tables  # noqa: E402


# ----------------------------------------------------------------------------- rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", GQA_HEADS)
@pytest.mark.parametrize("bt", BT)
def test_rope_fused_qkv_views(dtype, d, heads, bt):
    (b, t), (hq, hk) = bt, heads
    q, k, v = qkv_views(b, t, hq, hk, d, dtype)
    v_before = v.clone()
    cos, sin = (x.to(DEV) for x in rope_tables(d, 64, 10000.0, None))
    pos = torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(5)).to(DEV)
    q_ref, k_ref = apply_rope_ref(q, k, cos, sin, pos)
    apply_rope_(q, k, cos, sin, pos.to(torch.int32) if b == 3 else pos)
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_multi_token_programs_tail_and_bad_positions(dtype):
    from kernels.rope import _launch_shape
    b, t, hq, hk, d, p = 1, 37, 28, 4, 128, 64
    if INTERPRET and dtype == torch.bfloat16:  # 4 tokens x 32 heads per program: 10 programs, the last 1 token
        assert _launch_shape(b * t, hq + hk, 64, 2, 1) == (4, 32, 16)
    q, k, _ = qkv_views(b, t, hq, hk, d, dtype)
    q0, k0 = q.clone(), k.clone()
    cos, sin = (x.to(DEV) for x in rope_tables(d, p, 10000.0, None))
    pos = torch.arange(t, device=DEV)[None] + 20
    pos[0, 3], pos[0, 30] = -1, p  # out of range: left unrotated
    bad = (pos < 0) | (pos >= p)
    q_ref, k_ref = apply_rope_ref(q, k, cos, sin, pos.clamp(0, p - 1))
    q_ref[bad], k_ref[bad] = q0[bad].float(), k0[bad].float()
    apply_rope_(q, k, cos, sin, pos)
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)


def _rope_case(b, t, hq, hk, d, dtype, p=64):
    q, k, v = qkv_views(b, t, hq, hk, d, dtype)
    cos, sin = (x.to(DEV) for x in rope_tables(d, p, 10000.0, None))
    pos = torch.randint(0, p, (b, t), generator=torch.Generator().manual_seed(7)).to(DEV)
    return q, k, v, cos, sin, pos


def test_rope_block_h_and_candidates():
    from kernels.rope import _block_h, _candidates
    # head blocks pad Hq + Hk by <= 1/4: Qwen2.5-7B (28 + 4) is one exact 32-head block
    assert [_block_h(h) for h in (32, 72, 48, 36, 14, 6, 1)] == [32, 16, 16, 8, 16, 2, 1]
    cands = _candidates(2048, 32, 64, 2, 132)
    assert cands[0] == (4, 32, 16) and len(set(cands)) == len(cands) <= 12
    assert {bh for _, bh, _ in cands} == {32, 16} and max(bt for bt, _, _ in cands) == 8
    assert all(bt == 1 for bt, _, _ in _candidates(1, 32, 64, 2, 132))  # decode: one token


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 13, 28, 4, 128), (3, 5, 5, 3, 96), (2, 7, 6, 2, 64)])
def test_rope_every_candidate_matches_ref(dtype, shape):
    """Every tuning candidate (and head blocks straddling the q/k boundary) is right on odd shapes:
    a token tail, Hq + Hk not a power of two, D/2 not a power of two, fused-qkv strided views."""
    from kernels.rope import _candidates, _launch
    b, t, hq, hk, d = shape
    bd = triton.next_power_of_2(d // 2)
    esize = torch.finfo(dtype).bits // 8
    cfgs = {c for sms in (1, 132) for c in _candidates(b * t, hq + hk, bd, esize, sms)}
    for cfg in sorted(cfgs | {(1, 1, 1), (2, 2, 2), (4, 4, 4), (16, 8, 4)}):
        q, k, v, cos, sin, pos = _rope_case(b, t, hq, hk, d, dtype)
        v0 = v.clone()
        q_ref, k_ref = apply_rope_ref(q, k, cos, sin, pos)
        _launch(q, k, cos, sin, pos.to(torch.int32) if b == 3 else pos, cfg)
        close(q, q_ref, dtype)
        close(k, k_ref, dtype)
        assert torch.equal(v, v0), cfg


def test_rope_scratch_views_same_layout_other_memory():
    from kernels.rope import _scratch_views
    q, k, _ = qkv_views(2, 3, 5, 3, 64, torch.bfloat16)
    before = q.clone(), k.clone()
    for xs in ((q, k), (q[:, 1:], k[:, 1:]), (q.clone(), k[:, :, 1:])):
        views = _scratch_views(*xs)
        for s in views:
            s.fill_(7.0)
        assert torch.equal(q, before[0]) and torch.equal(k, before[1])
        for x, s in zip(xs, views):
            assert s.shape == x.shape and s.stride() == x.stride() and s.dtype == x.dtype
            assert s.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
            assert (s.data_ptr() - x.data_ptr()) % 16 == 0  # same alignment: same compiled variant
        shared = xs[0].untyped_storage().data_ptr() == xs[1].untyped_storage().data_ptr()
        assert (views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()) == shared
        if shared:  # one buffer, the same relative offset, no larger than the span plus alignment
            assert views[1].data_ptr() - views[0].data_ptr() == xs[1].data_ptr() - xs[0].data_ptr()
            end = xs[1][-1, -1, -1, -1:].data_ptr() + 2  # past k's last element
            assert views[0].untyped_storage().nbytes() <= end - xs[0].data_ptr() + 16


def test_rope_tune_picks_fastest_without_touching_inputs():
    """The tuner times every candidate on scratch copies (fake timer), skips one that cannot
    compile and keeps the fastest; the caller's q, k (and v) are unchanged."""
    from triton.runtime.errors import OutOfResources
    from kernels.rope import _candidates, _tune
    q, k, v, cos, sin, pos = _rope_case(2, 5, 7, 1, 64, torch.bfloat16)
    before = [x.clone() for x in (q, k, v)]
    cands = _candidates(10, 8, 32, 2, 1)
    times = {c: 5.0 + i for i, c in enumerate(cands)}
    fastest, broken = cands[2], cands[1]
    times[fastest], timed = 1.0, []

    def timer(fn):
        cfg = fn.__defaults__[0]
        timed.append(cfg)
        if cfg == broken:
            raise OutOfResources(1, 0, "shared memory")
        fn()  # really runs (interpreter), on the scratch
        return times[cfg]

    assert _tune(q, k, cos, sin, pos, cands, timer=timer) == fastest
    assert timed == cands
    assert all(torch.equal(x, x0) for x, x0 in zip((q, k, v), before))


def test_rope_tunes_once_per_bucket_and_caches(monkeypatch: pytest.MonkeyPatch):
    from kernels import rope
    monkeypatch.setattr(rope, "_TUNED", {})
    monkeypatch.setattr(rope, "_tunable", lambda q: True)  # as on CUDA outside a capture
    sms = rope._num_sms(0) if torch.cuda.is_available() else 1  # what apply_rope_ plans with
    cands = rope._candidates(10, 4, 32, 4, sms)
    calls, fastest = [], cands[2]

    def fake_graph_ms(fn):
        calls.append(fn.__defaults__[0])
        return 1.0 if fn.__defaults__[0] == fastest else 2.0

    monkeypatch.setattr(rope, "graph_ms", fake_graph_ms)
    for t in (5, 7):  # B*T 10 and 14: one bucket (16), timed once
        q, k, v, cos, sin, pos = _rope_case(2, t, 3, 1, 64, torch.float32)
        q_ref, k_ref = apply_rope_ref(q, k, cos, sin, pos)
        apply_rope_(q, k, cos, sin, pos)
        close(q, q_ref, torch.float32)
        close(k, k_ref, torch.float32)
    assert calls == cands
    assert rope._TUNED == {(16, 3, 1, 64, torch.float32): fastest}


def test_rope_tunable_only_on_cuda_outside_capture(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace
    from kernels import rope
    gpu = SimpleNamespace(is_cuda=True)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setenv("KERNELS_AUTOTUNE", "1")
    assert rope._tunable(gpu) and not rope._tunable(SimpleNamespace(is_cuda=False))
    capturing[0] = True
    assert not rope._tunable(gpu)
    capturing[0] = False
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")
    assert not rope._tunable(gpu)
    monkeypatch.setattr(rope, "_TUNED", {})  # untunable: the heuristic, nothing cached
    q, k, _, cos, sin, pos = _rope_case(1, 3, 2, 2, 64, torch.float32)
    apply_rope_(q, k, cos, sin, pos)
    assert rope._TUNED == {}


def test_rope_tune_caps_scratch(monkeypatch: pytest.MonkeyPatch):
    """Past _SCRATCH_BYTES the tuner times the leading tokens of one sequence instead."""
    from kernels import rope
    q, k, _, cos, sin, pos = _rope_case(2, 16, 3, 1, 64, torch.float32)
    seen = []
    real = rope._scratch_views
    monkeypatch.setattr(rope, "_scratch_views", lambda *xs: seen.append(xs[0].shape) or real(*xs))
    monkeypatch.setattr(rope, "_SCRATCH_BYTES", 8 * 5 * 64 * 4)  # 8 tokens of the fused qkv row
    assert rope._tune(q, k, cos, sin, pos, [(4, 4, 4)], timer=lambda fn: fn() or 1.0) == (4, 4, 4)
    assert seen == [(1, 8, 3, 64)]


@cuda_only
def test_real_shape_rope_tuned_once(monkeypatch: pytest.MonkeyPatch):
    """Tuning on the real shape times scratch copies: the caller's q/k are rotated exactly once."""
    from kernels import rope
    monkeypatch.setenv("KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(rope, "_TUNED", {})
    q, k, _, cos, sin, pos = _rope_case(1, 2048, 28, 4, 128, torch.bfloat16, p=4096)
    q_ref, k_ref = apply_rope_ref(q, k, cos, sin, pos)
    apply_rope_(q, k, cos, sin, pos)
    close(q, q_ref, torch.bfloat16)
    close(k, k_ref, torch.bfloat16)
    assert list(rope._TUNED) == [(2048, 28, 4, 128, torch.bfloat16)]


def test_rope_matches_transformers_apply():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    b, t, h, d = 2, 6, 3, 64
    q, k = rand(b, t, h, d), rand(b, t, h, d, seed=9)
    cos, sin = rope_tables(d, 32, 10000.0, None)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 20, 21, 31]])
    c, s = torch.cat([cos[pos], cos[pos]], -1), torch.cat([sin[pos], sin[pos]], -1)
    hq, hk = llama.apply_rotary_pos_emb(q.cpu().transpose(1, 2), k.cpu().transpose(1, 2), c, s)
    apply_rope_(q, k, cos.to(DEV), sin.to(DEV), pos.to(DEV))
    close(q.cpu(), hq.transpose(1, 2), torch.float32)
    close(k.cpu(), hk.transpose(1, 2), torch.float32)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling,theta", [(None, 10000.0), ({"rope_type": "default"}, 1e6), (LLAMA3, 500000.0)])
def test_rope_tables_match_transformers(scaling, theta):
    tf = pytest.importorskip("transformers")
    try:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = tf.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=512,
                             rope_theta=theta, rope_scaling=scaling)
        cos_hf, sin_hf = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 1, 64), torch.arange(300)[None])
    except (ImportError, TypeError, AttributeError, KeyError) as e:
        pytest.skip(f"transformers rotary API differs: {e}")
    cos, sin = rope_tables(64, 300, theta, scaling)
    assert cos.dtype == torch.float32 and cos.shape == (300, 32)
    torch.testing.assert_close(cos, cos_hf[0, :, :32], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0, :, 32:], rtol=0, atol=1e-6)


def test_rope_bad_inputs():
    q, k, _ = qkv_views(1, 2, 2, 1, 64, torch.float32)
    cos, sin = (x.to(DEV) for x in rope_tables(64, 16, 10000.0, None))
    pos = torch.zeros(1, 2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="unsupported rope type"):
        rope_tables(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="positions"):
        apply_rope_(q, k, cos, sin, pos.float())
    with pytest.raises(ValueError, match="cos"):
        apply_rope_(q, k, cos.half(), sin, pos)
    with pytest.raises(ValueError, match="dtype"):
        apply_rope_(q, k.half(), cos, sin, pos)
    with pytest.raises(ValueError, match="contiguous"):
        apply_rope_(q[..., ::2], k[..., ::2], cos[:, :16].contiguous(), sin[:, :16].contiguous(), pos)


@cuda_only
@pytest.mark.parametrize("hq,hk,d", [(28, 4, 128), (64, 8, 128), (40, 8, 128)])
def test_real_shapes_rope_kv_append(hq, hk, d):
    b, t, seq = 2, 2048, 32768
    q, k, v = qkv_views(b, t, hq, hk, d, torch.bfloat16)
    cos, sin = (x.to(DEV) for x in rope_tables(d, seq, 500000.0, LLAMA3 | {"original_max_position_embeddings": 8192}))
    pos = torch.stack([torch.arange(t), torch.arange(t) + 30000]).to(DEV)
    q_ref, k_ref = apply_rope_ref(q, k, cos, sin, pos)
    apply_rope_(q, k, cos, sin, pos)
    close(q, q_ref, torch.bfloat16)
    close(k, k_ref, torch.bfloat16)
    k_cache = torch.zeros(b, hk, seq, d, dtype=torch.bfloat16, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    start = torch.tensor([0, 31000], dtype=torch.int32, device=DEV)
    ref_k, ref_v = kv_append_ref(k[:, :8], v[:, :8], k_cache, v_cache, start)  # ref loop: keep T small
    kv_append_(k[:, :8], v[:, :8], k_cache, v_cache, start)
    assert torch.equal(k_cache.float(), ref_k) and torch.equal(v_cache.float(), ref_v)
    kv_append_(k, v, k_cache, v_cache, start)
    assert torch.equal(k_cache[1, :, 31000:], k[1, : seq - 31000].transpose(0, 1))
