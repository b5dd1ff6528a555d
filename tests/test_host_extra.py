"""engine.host_extra: a host layer's time beyond its projections, as the plan counts it (issue 18)."""

from __future__ import annotations

import time
import types

import pytest
import torch

from engine.config import ModelConfig
from engine.engine import Engine
from engine.host_extra import _ProjectionsOff, stand_ins, layer_extra_s
from engine.host_lane import HOST_KV_DTYPE, HostOps
from engine.model import Model

BASE = dict(model_type="qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=16384, rms_norm_eps=1e-6)


def _cfg(**kw) -> ModelConfig:
    """Built directly (a GGUF's config is: a llama-architecture file with q/k/v biases has attention_bias; a
    config.json saying so for llama means an o_proj bias too, which from_dict refuses)."""
    return ModelConfig(**{**BASE, **kw})


def _real_weights(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = {}
    for name, t in stand_ins(cfg, dtype).items():
        if name.endswith("proj.weight"):
            k = cfg.intermediate_size if "down" in name else cfg.q_size if "o_proj" in name else cfg.hidden_size
            w[name] = (torch.randn(t.shape[0], k, generator=g) * 0.05).to(dtype)
        else:
            w[name] = t
    return w


@pytest.mark.parametrize("kw", [dict(model_type="qwen2"), dict(model_type="qwen3", head_dim=64),
                                dict(model_type="llama", attention_bias=True)], ids=["qwen2", "qwen3", "llama-bias"])
def test_the_stand_ins_run_the_lane_s_layer_code_with_the_real_shapes(kw):
    """Model.layer on the stand-ins (projections off) returns what the real weights' layer returns in shape and dtype,
    and the stand-ins are the tensors the lane's layer reads (no fewer: a missing one would raise)."""
    cfg, dtype, b, ctx = _cfg(**kw), torch.bfloat16, 2, 32
    shape = (b, cfg.num_key_value_heads, ctx + 1, cfg.head_dim)
    h = torch.randn(b, 1, cfg.hidden_size).to(dtype)
    start, q_lens = torch.full((b,), ctx - 1, dtype=torch.int32), torch.ones(b, dtype=torch.int32)
    outs = []
    for ops, w in ((_ProjectionsOff(), stand_ins(cfg, dtype)), (HostOps(), _real_weights(cfg, dtype))):
        model = Model(cfg, None, ops, torch.device("cpu"), dtype, ctx + 1)
        kv = (torch.zeros(shape, dtype=HOST_KV_DTYPE), torch.zeros(shape, dtype=HOST_KV_DTYPE))
        outs.append(model.layer(w, h, h, model.positions(start, 1), kv, start, q_lens, ctx))
    for a, r in zip(*outs):
        assert a.shape == r.shape and a.dtype == r.dtype
    assert ("self_attn.q_norm.weight" in stand_ins(cfg, dtype)) == cfg.has_qk_norm
    assert ("self_attn.qkv_proj.bias" in stand_ins(cfg, dtype)) == bool(cfg.attention_bias)


def test_the_extra_time_grows_with_the_positions_attention_reads(one_torch_thread):
    """Positive, and longer over 8,192 positions than over 16 (the fp32 attention reads 16 MB more)."""
    cfg = _cfg()
    short = layer_extra_s(cfg, torch.bfloat16, 1, 16)
    long = layer_extra_s(cfg, torch.bfloat16, 1, 8192)
    assert 0 < short < long


def test_the_extra_time_leaves_out_the_projections(one_torch_thread):
    """Beside a layer with real weights, large enough that reading them dominates: the extra is the smaller part."""
    cfg = _cfg(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4)
    extra = layer_extra_s(cfg, torch.float32, 1, 64)
    model = Model(cfg, None, HostOps(), torch.device("cpu"), torch.float32, 65)
    w = _real_weights(cfg, torch.float32)  # ~50 MB of fp32 weights
    shape = (1, cfg.num_key_value_heads, 65, cfg.head_dim)
    kv = (torch.zeros(shape), torch.zeros(shape))
    h, q_lens = torch.randn(1, 1, cfg.hidden_size), torch.ones(1, dtype=torch.int32)
    start = torch.full((1,), 63, dtype=torch.int32)
    pos = model.positions(start, 1)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.layer(w, h, h, pos, kv, start, q_lens, 64)
        times.append(time.perf_counter() - t0)
    assert extra < sorted(times)[2] / 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="positive"):
        layer_extra_s(_cfg(), torch.bfloat16, 0, 16)
    with pytest.raises(ValueError, match="positive"):
        layer_extra_s(_cfg(), torch.bfloat16, 1, 0)


@pytest.mark.parametrize("gbps,source,measured", [(None, "not measured: host compute off", False),
                                                  (30.0, "achieved by the host lane on 2026-12-05", False),
                                                  (30.0, "achieved by the host lane on x; host layers int4", False),
                                                  (30.0, "measured now", True), (30.0, "cached from 2026-12-01", True)])
def test_the_engine_measures_the_extra_only_beside_a_measured_gemv_rate(gbps, source, measured):
    """A rate the lane achieved already holds the layers' whole time; no rate, no host lane: 0 in both."""
    fake = types.SimpleNamespace(cfg=_cfg(), dtype=torch.bfloat16, opts=types.SimpleNamespace(batch=1, max_context=48))
    extra = Engine._host_extra(fake, gbps, source)
    assert (extra > 0) == measured
