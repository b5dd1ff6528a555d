"""kernels/qgemv_i8.py's SwiGLU prologue: x's int8 rounding computes silu(gate) * up itself, so the MLP's
down projection on the int8-x GEMV takes two launches instead of three, with the same numbers."""
from __future__ import annotations

import os

import pytest
import torch

from kernels import qgemv as q
from kernels.qgemv_i8 import quantize_x, swiglu_qgemv
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
