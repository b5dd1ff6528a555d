"""Tests for the fused gate_up GEMM + SwiGLU (kernels/gemm_swiglu.py) on both GEMM families.

Under TRITON_INTERPRET=1 (no CUDA) each family runs small odd shapes through the private launcher
with pinned configs: I not a multiple of the tile (the last gate tile reads up rows whose columns
the store clips), K not a multiple of BLOCK_K, M not a multiple of BLOCK_M. Checked against the
fp32 reference (``gemm_swiglu_ref``) and against the unfused kernels (``swiglu(gemm(x, w))``),
whose rounding the epilogue copies. The CUDA test runs the 7B's shape with the engine's own pick.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels import gemm_tma  # noqa: E402
from kernels.gemm import gemm  # noqa: E402
from kernels.gemm_swiglu import _gemm_swiglu, _halved, gemm_swiglu, gemm_swiglu_ref  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402

from tests.kernel_utils import DTYPES, MATMUL_TOL as TOL, needs_cuda, randn as rand, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()
TMA_DEVICE = not CUDA or torch.cuda.get_device_capability()[0] >= 9

FAMILIES = {
    "pointer": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}),
    "tma-persistent": gemm_tma.config(32, 16, 32, persistent=True, flatten=True),
    "tma-subtile": gemm_tma.config(32, 32, 32, persistent=True, subtile=True),
    "tma-one-tile-per-program": gemm_tma.config(64, 16, 16, persistent=False),
}
# against the unrounded fp32 reference: gate, up, silu and the product are each rounded to the dtype
# (as the unfused kernels do), ~1.2% in bf16 on these operands
REF_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# (M, K, I): I odd (out rows not 16-byte aligned: pointer store) or a multiple of 8 (TMA store)
SHAPES = [(70, 72, 23), (97, 200, 40), (33, 40, 16)]


def operands(M: int, K: int, inter: int, dtype: torch.dtype):
    return rand(M, K, dtype=dtype), rand(2 * inter, K, dtype=dtype, scale=K ** -0.5)


def _run(x, w, name: str) -> torch.Tensor:
    if name != "pointer" and not TMA_DEVICE:
        pytest.skip("TMA needs CUDA capability >= 9")
    return _gemm_swiglu(x, w, FAMILIES[name])


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,inter", SHAPES)
def test_gemm_swiglu_families(M: int, K: int, inter: int, dtype: torch.dtype, name: str) -> None:
    x, w = operands(M, K, inter, dtype)
    out = _run(x, w, name)
    assert out.shape == (M, inter) and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, gemm_swiglu_ref(x, w)) < REF_TOL[dtype]
    unfused = swiglu(gemm(x, w))  # the same rounding steps; other tiles sum K in another order
    assert rel_err(out, unfused.float()) < TOL[dtype] / 4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gemm_swiglu_strided_x(name: str) -> None:
    """x a column slice of a wider tensor (row stride 2K), as a norm's output view may be."""
    K, inter = 64, 24
    x = rand(75, 2 * K, dtype=torch.bfloat16)[:, K:]
    w = rand(2 * inter, K, dtype=torch.bfloat16, scale=K ** -0.5)
    assert rel_err(_run(x, w, name), gemm_swiglu_ref(x, w)) < REF_TOL[torch.bfloat16]


def test_gemm_swiglu_default_pick_and_checks() -> None:
    """The public entry (its derived config) matches the reference; bad operands get ValueErrors."""
    x, w = operands(65, 48, 20, torch.float32)
    assert rel_err(gemm_swiglu(x, w), gemm_swiglu_ref(x, w)) < REF_TOL[torch.float32]
    with pytest.raises(ValueError, match="odd"):
        gemm_swiglu(x, w[:-1])
    with pytest.raises(ValueError, match="K mismatch"):
        gemm_swiglu(x[:, :40], w)
    with pytest.raises(ValueError, match="dtype"):
        gemm_swiglu(x.bfloat16(), w)


def test_halved_config_keeps_the_rest() -> None:
    cfg = gemm_tma.config(128, 256, 64, warps=8, stages=3, persistent=True, flatten=True)
    half = _halved(cfg)
    assert half.kwargs["BLOCK_N"] == 128 and half.num_warps == 8 and half.num_stages == 3
    assert {k: v for k, v in half.kwargs.items() if k != "BLOCK_N"} == \
        {k: v for k, v in cfg.kwargs.items() if k != "BLOCK_N"}
    small = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4})
    assert _halved(small).kwargs["BLOCK_N"] == 16


@needs_cuda
@pytest.mark.parametrize("M", [257, 2048])
def test_gemm_swiglu_qwen_7b_shape(M: int) -> None:
    """The 7B's MLP (K 3584, I 18944) with the engine's pick: against the reference and the unfused pair."""
    x, w = operands(M, 3584, 18944, torch.bfloat16)
    out = gemm_swiglu(x, w)
    assert rel_err(out, gemm_swiglu_ref(x, w)) < REF_TOL[torch.bfloat16]
    assert rel_err(out, swiglu(gemm(x, w)).float()) < TOL[torch.bfloat16]


def test_config_from_the_unfused_pick_else_its_own_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unfused gate_up GEMM's pick, halved, when there is one; else a tuning over the halved
    candidates (stored as "gemm_swiglu"); either is remembered per key."""
    from kernels import gemm as gemm_mod
    from kernels import gemm_swiglu as mod
    x, w = operands(80, 32, 24, torch.float32)
    key = (128, 48, 32, torch.float32, False)
    monkeypatch.setattr(mod, "_PICKS", {})
    monkeypatch.setitem(gemm_mod._TUNED, key, FAMILIES["tma-subtile"])
    out = gemm_swiglu(x, w)
    assert mod._PICKS[key].kwargs["BLOCK_N"] == 16 and mod._PICKS[key].kwargs.get("TMA")
    assert rel_err(out, gemm_swiglu_ref(x, w)) < REF_TOL[torch.float32]

    del gemm_mod._TUNED[key]
    monkeypatch.setattr(mod, "_PICKS", {})
    two = [FAMILIES["pointer"], gemm_tma.config(32, 32, 32, persistent=False)]
    monkeypatch.setattr(gemm_mod, "_candidates", lambda x, tma_ok: two)
    seen = {}

    def tuned(device, kernel, k, cands, tune):
        seen.update(kernel=kernel, key=k, widths=[c.kwargs["BLOCK_N"] for c in cands])
        return cands[1]
    monkeypatch.setattr(mod.tuning_cache, "tuned", tuned)
    monkeypatch.setattr(mod.tuning_cache, "choose", lambda *a, **k: None)
    out = gemm_swiglu(x, w)
    assert seen == {"kernel": "gemm_swiglu", "key": key, "widths": [16, 16]}
    assert mod._PICKS[key].kwargs.get("TMA") and rel_err(out, gemm_swiglu_ref(x, w)) < REF_TOL[torch.float32]
