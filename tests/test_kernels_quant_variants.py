"""Tests for the quantized matmuls' faster variants (kernels/quant_variants.py) against dequant_ref.

Each variant is pinned through the ``config(...)`` helpers and run under TRITON_INTERPRET=1 on tiny
odd shapes that reach every scale path: one group per tile (G a multiple of BLOCK_K, per channel),
several groups per tile (G = 32 / 64 against 64 / 128-wide tiles) and groups that straddle tiles
(G = 96 against 64), with K tails, N not a multiple of BLOCK_N, int4 and int8, zero points,
symmetric codes, additive mins and bias.  One-hot inputs check that the magic-number conversion
and the in-place codes reproduce every code position of a word bit-exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels import qgemm as qgemm_mod  # noqa: E402
from kernels import qgemv as qgemv_mod  # noqa: E402
from kernels.qgemm import _qgemm  # noqa: E402
from kernels.qgemv import _qgemv  # noqa: E402
from kernels.quant_common import dequant_ref  # noqa: E402
from kernels.quant_variants import VARIANTS, variant_ok  # noqa: E402

from tests.kernel_utils import DEV, MATMUL_TOL, randn, rel_err  # noqa: E402
from tests.test_kernels_quant import packed, with_mins  # noqa: E402

# (bits, form): zero points, symmetric, additive mins
FORMS = [(4, "zeros"), (4, "sym"), (8, "zeros"), (4, "mins"), (8, "mins")]


def operands(n: int, k: int, g: int, bits: int, form: str, seed: int = 0):
    """(qweight, scales, zeros, mins) of one form."""
    if form == "mins":
        q, s, m = with_mins(n, k, g, bits, seed=seed)
        return q, s, None, m
    q, s, z = packed(n, k, g, bits, sym=form == "sym", seed=seed)
    return q, s, z, None


def reference(x, q, s, z, m, bits, bias):
    out = x.float() @ dequant_ref(q, s, z, bits, m).T
    return out if bias is None else out + bias.float()


# (K, N, G, BLOCK_K): several groups per tile + K tail, one group per tile, per channel with a tail,
# groups straddling tiles (G = 96, BLOCK_K = 64), G = 32 with a K tail
M1_SHAPES = [(192, 45, 64, 128), (384, 33, 128, 64), (200, 17, 200, 64), (288, 24, 96, 64), (160, 40, 32, 64)]


@pytest.mark.parametrize("variant", ["3d"])
@pytest.mark.parametrize("bits,form", FORMS)
@pytest.mark.parametrize("K,N,G,BK", M1_SHAPES)
def test_gemv_m1_variants(K: int, N: int, G: int, BK: int, bits: int, form: str, variant: str) -> None:
    q, s, z, m = operands(N, K, G, bits, form)
    x = randn(1, K, dtype=torch.float32)
    bias = randn(N, dtype=torch.float32) if N % 2 else None
    cfg = qgemv_mod.config(8 if N < 40 else 16, BK, 2 if K // BK >= 4 else 1, variant=VARIANTS[variant])
    out = _qgemv(x, q, s, z, bits, bias, cfg=cfg, mins=m)
    assert out.shape == (1, N) and out.dtype == torch.float32
    assert rel_err(out, reference(x, q, s, z, m, bits, bias)) < MATMUL_TOL[torch.float32]


# (M, K, N, G): for BLOCK_K = 16 * P (128 int4, 64 int8)
DOT_SHAPES = [(3, 192, 45, 64), (17, 288, 24, 96), (3, 200, 17, 200), (17, 160, 40, 32), (2, 384, 33, 128)]


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("bits,form", FORMS)
@pytest.mark.parametrize("M,K,N,G", DOT_SHAPES)
def test_gemv_split_dots(M: int, K: int, N: int, G: int, bits: int, form: str, swap: bool) -> None:
    q, s, z, m = operands(N, K, G, bits, form, seed=1)
    x = randn(M, K, dtype=torch.float32)
    bias = randn(N, dtype=torch.float32) if N % 2 else None
    cfg = qgemv_mod.config(16, 16 * 32 // bits, 2 if M == 3 else 1, swap=swap, variant=VARIANTS["split"])
    out = _qgemv(x, q, s, z, bits, bias, cfg=cfg, mins=m)
    assert out.shape == (M, N)
    assert rel_err(out, reference(x, q, s, z, m, bits, bias)) < MATMUL_TOL[torch.float32]


GEMM_SHAPES = [(70, 192, 45, 64), (17, 288, 24, 96), (33, 200, 17, 200), (40, 256, 63, 128)]


@pytest.mark.parametrize("variant", ["swap", "split", "split+swap"])
@pytest.mark.parametrize("bits,form", FORMS)
@pytest.mark.parametrize("M,K,N,G", GEMM_SHAPES)
def test_gemm_variants(M: int, K: int, N: int, G: int, bits: int, form: str, variant: str) -> None:
    q, s, z, m = operands(N, K, G, bits, form, seed=2)
    x = randn(M, K, dtype=torch.float32)
    bias = randn(N, dtype=torch.float32) if N % 2 else None
    split = variant.startswith("split")
    cfg = qgemm_mod.config(32 if M > 32 else 16, 32, 16 * 32 // bits if split else 64, 2,
                           swap=variant.endswith("swap"), variant=VARIANTS["split"] if split else 0)
    out = _qgemm(x, q, s, z, bits, bias, cfg=cfg, mins=m)
    assert out.shape == (M, N)
    assert rel_err(out, reference(x, q, s, z, m, bits, bias)) < MATMUL_TOL[torch.float32]


@pytest.mark.parametrize("bits", [4, 8])
def test_variants_half_precision(bits: int) -> None:
    """bf16 activations and scales: the split dots cast the dequantized weight to x's dtype."""
    M, K, N, G = 17, 256, 40, 64
    q, s, z = packed(N, K, G, bits, sym=False, sdtype=torch.bfloat16, seed=3)
    x, bias = randn(M, K, dtype=torch.bfloat16), randn(N, dtype=torch.bfloat16)
    ref = reference(x, q, s, z, None, bits, bias)
    bk = 16 * 32 // bits
    for cfg in (qgemv_mod.config(16, bk, swap=True, variant=3), qgemv_mod.config(16, bk, variant=3)):
        out = _qgemv(x, q, s, z, bits, bias, cfg=cfg)
        assert out.dtype == torch.bfloat16 and rel_err(out, ref) < MATMUL_TOL[torch.bfloat16], cfg
    for cfg in (qgemm_mod.config(16, 32, bk, swap=True, variant=3), qgemm_mod.config(16, 32, 64, swap=True)):
        assert rel_err(_qgemm(x, q, s, z, bits, bias, cfg=cfg), ref) < MATMUL_TOL[torch.bfloat16], cfg
    out = _qgemv(x[:1], q, s, z, bits, bias, cfg=qgemv_mod.config(8, 128, variant=1))
    assert rel_err(out, ref[:1]) < MATMUL_TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,form", [(4, "zeros"), (8, "zeros"), (4, "mins")])
def test_every_code_position_exact(bits: int, form: str) -> None:
    """One-hot x picks single weight columns: every code position i of a word (in place or shifted
    down) must come out bit-exact, through the FMA variants and the split dots alike."""
    per, K, N, G = 32 // bits, 128, 24, 32
    q, s, z, m = operands(N, K, G, bits, form, seed=4)
    w = dequant_ref(q, s, z, bits, m)

    def same(out: torch.Tensor, ref: torch.Tensor) -> bool:  # mins: c * s + m may be fused into one FMA
        return torch.equal(out, ref) if m is None else torch.allclose(out, ref, rtol=1e-6, atol=1e-7)

    for k in [*range(per), per + 3, K - 1]:
        x = torch.zeros(1, K, device=DEV)
        x[0, k] = 1.0
        out = _qgemv(x, q, s, z, bits, cfg=qgemv_mod.config(8, 64, variant=1), mins=m)
        assert same(out[0], w[:, k]), k
    eye = torch.eye(K, device=DEV)
    out = _qgemv(eye[:2 * per + 1], q, s, z, bits, cfg=qgemv_mod.config(16, 16 * per, variant=3), mins=m)
    assert same(out, w[:, :2 * per + 1].T)
    out = _qgemm(eye, q, s, z, bits, cfg=qgemm_mod.config(32, 16, 16 * per, swap=True, variant=3), mins=m)
    assert same(out, w.T)


def test_ineligible_variants_are_refused() -> None:
    """G = 4 splits an int4 word across groups: no variant can run it, the base path still does."""
    K, N, G = 64, 16, 4
    q, s, z = packed(N, K, G, 4, sym=False)
    assert not any(variant_ok(v, G, 4, 128) for v in (1, 2, 3)) and variant_ok(0, G, 4, 128)
    assert not variant_ok(3, 64, 4, 64) and variant_ok(3, 64, 8, 64)  # split dots need BLOCK_K / P >= 16
    x = randn(1, K, dtype=torch.float32)
    with pytest.raises(ValueError, match="variant 2 cannot run"):
        _qgemv(x, q, s, z, 4, cfg=qgemv_mod.config(8, 64, variant=2))
    with pytest.raises(ValueError, match="variant 1 cannot run M=3"):
        _qgemv(randn(3, K, dtype=torch.float32), q, s, z, 4, cfg=qgemv_mod.config(8, 64, variant=1))
    with pytest.raises(ValueError, match="variant 3 cannot run"):
        _qgemm(randn(70, K, dtype=torch.float32), q, s, z, 4, cfg=qgemm_mod.config(32, 32, 128, variant=3))
    out = _qgemv(x, q, s, z, 4, cfg=qgemv_mod.config(8, 64))
    assert rel_err(out, reference(x, q, s, z, None, 4, None)) < MATMUL_TOL[torch.float32]


def test_candidate_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the interpreter every variant is a candidate where it can run, and the lists stay modest."""
    import kernels.qgemv_candidates as cands_mod
    monkeypatch.setattr(cands_mod, "_INTERPRET", False)
    monkeypatch.setattr(qgemm_mod, "_INTERPRET", False)
    for block_m, want in ((1, {0, 1}), (16, {0, 3})):
        cands = qgemv_mod._candidates(block_m, 4608, 3584, 132, 128, 4)
        assert {c.kwargs["VARIANT"] for c in cands} == want and len(cands) <= 36
        assert all(variant_ok(c.kwargs["VARIANT"], 128, 4, c.kwargs["BLOCK_K"]) for c in cands)
        assert {c.kwargs["VARIANT"] for c in qgemv_mod._candidates(block_m, 4608, 3584, 132, 4, 4)} == {0}
    cands = qgemm_mod._configs(128, 4)
    assert {(c.kwargs["SWAP_AB"], c.kwargs["VARIANT"]) for c in cands} == {(False, 0), (True, 3)}
    assert len(cands) <= 8 and len({str(c) for c in cands}) == len(cands)
    assert {c.kwargs["VARIANT"] for c in qgemm_mod._configs(4, 4)} == {0}


@pytest.mark.parametrize("bits,form", FORMS)
@pytest.mark.parametrize("M,K,N,G", [(1, 192, 45, 64), (5, 256, 40, 128)])
def test_tuner_accepts_only_outputs_that_match_the_dequantized_weight(M, K, N, G, bits, form):
    """The qgemv/qgemm tuners' ``accept``: a candidate's output must match fp32 torch on the sampled
    columns, so a miscompiled variant is never picked however fast it runs."""
    from kernels.quant_common import agrees_with_reference

    q, s, z, m = operands(N, K, G, bits, form, seed=3)
    x = randn(M, K, dtype=torch.float32)
    bias = randn(N, dtype=torch.float32)
    out = reference(x, q, s, z, m, bits, bias).to(torch.bfloat16)
    accept = agrees_with_reference(x, q, s, m if form == "mins" else z, bits, form == "mins", bias, out)
    assert accept(None)  # right up to bf16 rounding
    out[:, ::13] *= 1.5  # a wrong candidate on the sampled columns
    assert not accept(None)
    out.copy_(reference(x, q, s, z, m, bits, bias).to(torch.bfloat16))
    out[0, 0] = float("nan")
    assert not accept(None)
