"""The int8-x GEMV's x rounding fused into its producers, with the same numbers as the launches it saves:
kernels/qgemv_i8.py's SwiGLU prologue (the MLP's down projection) and kernels/add_rmsnorm_i8.py (the norm
before qkv and gate_up)."""
from __future__ import annotations

import os

import pytest
import torch

from kernels import qgemv as q
from kernels.add_rmsnorm import add_rmsnorm
from kernels.add_rmsnorm_i8 import add_rmsnorm_i8, add_rmsnorm_qgemv
from kernels.qgemv_i8 import swiglu_qgemv
from kernels.quant_x import quantize_x
from kernels.swiglu import swiglu
from tools.bench_quant import packed_operands

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 96), (3, 256), (4, 1056)])
def test_rounding_swiglu_equals_rounding_its_output(m: int, k: int, dtype: torch.dtype) -> None:
    """The fused stage 1 gives exactly the codes, steps and sums of stage 1 on kernels.swiglu's output."""
    gu = (torch.randn(m, 2 * k, device=DEV) * 3).to(dtype)
    for a, b in zip(quantize_x(gu, swiglu=True), quantize_x(swiglu(gu))):
        assert torch.equal(a, b)


def _tuned_to(monkeypatch, key: tuple, cfg) -> None:
    monkeypatch.setattr(q, "_TUNED", {key: cfg} if cfg is not None else {})


@pytest.mark.parametrize("m", [1, 3])
def test_fused_only_where_the_tuner_picked_variant_4(m: int, monkeypatch) -> None:
    k, n, group = 256, 48, 128
    x, qw, s, z = packed_operands(1, k, n, 4, group, device=DEV)
    gu = torch.randn(m, 2 * k, device=DEV).to(torch.bfloat16)
    key = q.tuning_key(m, n, k, group, 4, True, False, torch.bfloat16, s.dtype, False)
    _tuned_to(monkeypatch, key, None)
    assert swiglu_qgemv(gu, qw, s, z, 4) is None  # not tuned yet: the caller runs swiglu, then qgemv (which tunes)
    _tuned_to(monkeypatch, key, q.config(16, 128, 1, variant=1))
    assert swiglu_qgemv(gu, qw, s, z, 4) is None  # another variant won
    cfg = q.config(16, 128, 1, warps=4, stages=2, variant=4)
    _tuned_to(monkeypatch, key, cfg)
    out = swiglu_qgemv(gu, qw, s, z, 4)
    want = q._qgemv(swiglu(gu), qw, s, z, 4, cfg=cfg)
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert torch.equal(out, want)
    assert swiglu_qgemv(gu[:, :-32].contiguous(), qw, s, z, 4) is None  # gate / up halves that do not fit the weight
    assert swiglu_qgemv(gu, qw, s, z, 8) is None  # int8 codes: not this GEMV


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 96), (2, 256), (4, 3584)])
def test_norm_rounding_equals_rounding_the_norms_output(m: int, k: int, dtype: torch.dtype) -> None:
    """The same new residual as kernels.add_rmsnorm, and the codes, steps and sums of stage 1 on its normed rows."""
    x, r = (torch.randn(m, k, device=DEV) * 4).to(dtype), torch.randn(m, k, device=DEV).to(dtype)
    w = (torch.rand(k, device=DEV) + 0.5).to(dtype)
    normed, res = add_rmsnorm(x, r, w, 1e-6)
    new_res, rounded = add_rmsnorm_i8(x, r, w, 1e-6)
    assert torch.equal(new_res, res)
    want = quantize_x(normed)
    assert torch.equal(rounded[2], want[2]) and torch.equal(rounded[0], want[0])
    assert torch.allclose(rounded[1], want[1], rtol=1e-6, atol=0)


def test_norm_fused_only_where_the_tuner_picked_variant_4(monkeypatch) -> None:
    m, k, n, group = 2, 256, 48, 128
    _, qw, s, z = packed_operands(1, k, n, 4, group, device=DEV)
    x, r = torch.randn(m, k, device=DEV).to(torch.bfloat16), torch.randn(m, k, device=DEV).to(torch.bfloat16)
    w, bias = torch.rand(k, device=DEV).to(torch.bfloat16), torch.randn(n, device=DEV).to(torch.bfloat16)
    key = q.tuning_key(m, n, k, group, 4, True, False, torch.bfloat16, s.dtype, True)
    _tuned_to(monkeypatch, key, None)
    assert add_rmsnorm_qgemv(x, r, w, 1e-6, qw, s, z, 4, bias) is None
    _tuned_to(monkeypatch, key, q.config(16, 128, 1, variant=1))
    assert add_rmsnorm_qgemv(x, r, w, 1e-6, qw, s, z, 4, bias) is None
    cfg = q.config(16, 128, 1, warps=4, stages=2, variant=4)
    _tuned_to(monkeypatch, key, cfg)
    out, res = add_rmsnorm_qgemv(x, r, w, 1e-6, qw, s, z, 4, bias)
    normed, want_res = add_rmsnorm(x, r, w, 1e-6)
    assert torch.equal(res, want_res)
    assert torch.equal(out, q._qgemv(normed, qw, s, z, 4, bias, cfg=cfg))
    with pytest.raises(ValueError, match="add_rmsnorm_i8: x and residual"):
        add_rmsnorm_i8(x, r[:, :-32].contiguous(), w, 1e-6)


@pytest.mark.parametrize("b,splits,fused", [(1, 1, None), (3, 3, True), (2, 3, False)])
def test_attention_rounding_for_o_proj_equals_the_unfused_pair(b: int, splits: int, fused, monkeypatch) -> None:
    """kernels/attention_qgemv.py: the attention's epilogue rounds o_proj's x; the output equals the attention
    followed by the int8-x GEMV exactly (a single split, the last ticket's merge, pass 2), only where the tuner
    picked that GEMV, and for head dims the epilogue rounds."""
    from kernels import attention_decode as ad
    from kernels.attention_qgemv import attention_qgemv

    monkeypatch.setattr(ad, "_plan", lambda *a: (splits, ad._with_fused(ad._default_config(torch.bfloat16),
                                                                          bool(fused))))
    hq, hk, d, s_len, n, group = 4, 2, 64, 40, 48, 128
    k = hq * d
    _, qw, s, z = packed_operands(1, k, n, 4, group, device=DEV)
    qq = (torch.randn(b, hq, d, device=DEV)).to(torch.bfloat16)
    kc = torch.randn(b, hk, s_len, d, device=DEV).to(torch.bfloat16)
    vc = torch.randn(b, hk, s_len, d, device=DEV).to(torch.bfloat16)
    lens = torch.tensor([s_len - 3 * i for i in range(b)], dtype=torch.int32, device=DEV)
    key = q.tuning_key(b, n, k, group, 4, True, False, torch.bfloat16, s.dtype, False)
    _tuned_to(monkeypatch, key, None)
    assert attention_qgemv(qq, kc, vc, lens, 0.125, s_len, qw, s, z, 4) is None  # not tuned yet
    _tuned_to(monkeypatch, key, q.config(16, 128, 1, variant=1))
    assert attention_qgemv(qq, kc, vc, lens, 0.125, s_len, qw, s, z, 4) is None  # another variant won
    cfg = q.config(16, 128, 1, warps=4, stages=2, variant=4)
    _tuned_to(monkeypatch, key, cfg)
    out = attention_qgemv(qq, kc, vc, lens, 0.125, s_len, qw, s, z, 4)
    attn = ad.attention_decode(qq, kc, vc, lens, 0.125, s_len)
    want = q._qgemv(attn.view(b, k), qw, s, z, 4, cfg=cfg)
    assert out is not None and out.shape == (b, n) and torch.equal(out, want)
    odd = torch.randn(b, 8, 32, device=DEV).to(torch.bfloat16)[..., :24]  # head dim 24: not rounded there
    assert attention_qgemv(odd, kc[..., :24], vc[..., :24], lens, 0.125, s_len, qw[:, :24], s, z, 4) is None


@pytest.mark.parametrize("kind", ["zeros", "mins", "symmetric"])
def test_a_fused_producer_finds_the_config_the_tuner_stored(kind: str, monkeypatch) -> None:
    """kernels.qgemv_i8.tuned_pick looks up the key qgemv's own tuning stored (tuned through qgemv here, not a key
    built by hand), for a weight with zero points, with additive mins (GGUF repacked to int4: its key once differed,
    and the fused producers never ran for it) and symmetric: the fused SwiGLU runs and equals the unfused pair."""
    from kernels.qgemv_i8 import tuned_pick

    m, k, n, group = 1, 256, 48, 32
    x, qw, s, z = packed_operands(m, k, n, 4, group, device=DEV)
    mins = (-torch.rand(n, k // group, device=DEV) * 0.05).to(s.dtype) if kind == "mins" else None
    z = z if kind == "zeros" else None
    cfg = q.config(16, 32, 1, warps=4, stages=2, variant=4)
    monkeypatch.setattr(q, "_TUNED", {})
    monkeypatch.setattr(q, "_candidates", lambda *a, **kw: [cfg])  # the tuner's only candidate: this GEMV
    q.qgemv(x.to(torch.bfloat16), qw, s, z, 4, mins=mins)  # tunes, stores its pick
    assert tuned_pick(m, k, torch.bfloat16, x.device, qw, s, z, 4, None, mins) is not None
    gu = torch.randn(m, 2 * k, device=DEV).to(torch.bfloat16)
    out = swiglu_qgemv(gu, qw, s, z, 4, mins=mins)
    assert out is not None and torch.equal(out, q._qgemv(swiglu(gu), qw, s, z, 4, cfg=cfg, mins=mins))
