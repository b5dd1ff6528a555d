"""Tests for the matmul (gemm / gemv / linear) and prefill attention Triton kernels (decode
attention: tests/test_kernels_attention_decode.py).

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 on small
shapes; the real Qwen2.5 shapes are CUDA-only.  Set KERNELS_AUTOTUNE=1 to run
the GPU cases with tuned (instead of default) launch configs.  Every check compares with the
fp32 ``*_ref`` function by relative Frobenius error on fresh random inputs.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Fixed default launch configs keep the GPU run short; KERNELS_AUTOTUNE=1 tests tuned ones.
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels.attention_prefill import attention_prefill, attention_prefill_ref  # noqa: E402
from kernels.gemm import gemm, gemm_ref  # noqa: E402
from kernels.gemv import _gemv, gemv, gemv_ref  # noqa: E402
from kernels.linear import linear, linear_ref  # noqa: E402

from tests.kernel_utils import DEV, DTYPES, MATMUL_TOL as TOL, needs_cuda, randn as rand, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()




# ---------------------------------------------------------------- matmul ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(64, 32), (96, 80), (256, 128)])
@pytest.mark.parametrize("M", [1, 3, 8, 70])
def test_linear_small(M: int, K: int, N: int, dtype: torch.dtype) -> None:
    x = rand(M, K, dtype=dtype)
    w = rand(N, K, dtype=dtype, scale=K ** -0.5)
    bias = rand(N, dtype=dtype) if (M + K) % 2 else None
    out = linear(x, w, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, linear_ref(x, w, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_leading_dims_and_strided_x(dtype: torch.dtype) -> None:
    K, N = 96, 48
    big = rand(2, 5, 2 * K, dtype=dtype)
    x = big[..., K:]  # row stride 2K, unit stride along K
    w = rand(N, K, dtype=dtype, scale=K ** -0.5)
    out = linear(x, w)
    assert out.shape == (2, 5, N)
    assert rel_err(out, linear_ref(x, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemm_and_gemv_direct(dtype: torch.dtype) -> None:
    K, N = 160, 96
    w = rand(N, K, dtype=dtype, scale=K ** -0.5)
    bias = rand(N, dtype=dtype)
    for M in (1, 2, 33):
        x = rand(M, K, dtype=dtype)
        assert rel_err(gemv(x, w, bias), gemv_ref(x, w, bias)) < TOL[dtype]
        assert rel_err(gemm(x, w, bias), gemm_ref(x, w, bias)) < TOL[dtype]


def _gemv_config(swap_ab: bool, split_k: int, ticket: bool = False) -> triton.Config:
    """A pinned gemv launch config for one tensor-core path (M >= 2); ticket: the split-K
    partials are summed by the last program of each N block (no second kernel)."""
    bn = 64 if swap_ab and CUDA else 16  # 64 weight rows: the wgmma shape on Hopper
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split_k, "SWAP_AB": swap_ab,
                          "TICKET": ticket}, num_warps=4, num_stages=3 if CUDA else 1)


# M, N, K: odd N (tail n block), K both a multiple of BLOCK_K and not, and a K
# that leaves the last of 3 splits empty (K=200: 4 K blocks, 2 per split)
GEMV_CASES = [(2, 37, 128), (3, 83, 200), (8, 50, 131), (17, 19, 96), (33, 70, 257), (64, 33, 192)]


@pytest.mark.parametrize("split_k,ticket", [(1, False), (3, False), (3, True)], ids=["sk1", "sk3", "sk3-ticket"])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["dot", "swap_ab"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", GEMV_CASES)
def test_gemv_dot_paths(M: int, N: int, K: int, dtype: torch.dtype, swap_ab: bool,
                        split_k: int, ticket: bool) -> None:
    x = rand(M, K, dtype=dtype)
    w = rand(N, K, dtype=dtype, scale=K ** -0.5)
    for bias in (None, rand(N, dtype=dtype)):
        out = _gemv(x, w, bias, _gemv_config(swap_ab, split_k, ticket))
        assert out.shape == (M, N) and out.dtype == dtype
        assert rel_err(out, gemv_ref(x, w, bias)) < TOL[dtype]


@pytest.mark.parametrize("ticket", [False, True])
def test_gemv_fma_split_k(ticket: bool) -> None:
    """Batch 1 (CUDA-core path) with split-K, both ways of summing the partials; a second launch
    finds the ticket counters reset by the first."""
    from kernels.gemv import _cfg
    w, bias = rand(83, 200, dtype=torch.bfloat16, scale=200 ** -0.5), rand(83, dtype=torch.bfloat16)
    for _ in range(2):
        x = rand(1, 200, dtype=torch.bfloat16)
        out = _gemv(x, w, bias, _cfg(16, 64, 3, False, 4, 1, ticket))
        assert rel_err(out, gemv_ref(x, w, bias)) < TOL[torch.bfloat16]


def test_gemv_candidates_time_both_dot_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU the first-call tuner times both operand orders (M >= 2), never swap at M = 1."""
    import kernels.gemv as gemv_mod
    monkeypatch.setattr(gemv_mod, "_INTERPRET", False)
    for n, k in [(4608, 3584), (3584, 18944), (37888, 3584), (3584, 3584)]:
        assert not any(c.kwargs["SWAP_AB"] for c in gemv_mod._candidates(1, n, k, 2, 132))
        for block_m in (16, 32, 64):
            cands = gemv_mod._candidates(block_m, n, k, 2, 132)
            assert {c.kwargs["SWAP_AB"] for c in cands} == {False, True} and len(cands) <= 40
            assert all(c.kwargs["TICKET"] == (c.kwargs["SPLIT_K"] > 1) for c in cands)  # one kernel


def test_linear_bad_inputs() -> None:
    x = rand(4, 32, dtype=torch.float16)
    w = rand(16, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="K mismatch"):
        linear(x, rand(16, 31, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype mismatch"):
        linear(x, w.float())
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, rand(15, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype mismatch: bias"):
        linear(x, w, rand(16, dtype=torch.float32))
    with pytest.raises(ValueError, match="unsupported dtype"):
        linear(x.double(), w.double())
    with pytest.raises(ValueError, match="unit stride along K"):  # a column-major weight (row slices are fine)
        linear(x, rand(32, 16, dtype=torch.float16).t())
    with pytest.raises(ValueError, match="unit stride"):
        linear(rand(32, 4, dtype=torch.float16).t(), w)
    with pytest.raises(ValueError, match="w must be 2-D"):
        linear(x, w[None])
    with pytest.raises(ValueError, match="at most 64 rows"):
        gemv(rand(65, 32, dtype=torch.float16), w)


# ------------------------------------------------------- prefill attention ----

def _prefill_inputs(B, T, Hq, Hk, D, S, dtype, q_lens, start_pos):
    qkv = rand(B, T, (Hq + 2 * Hk) * D, dtype=dtype)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)  # strided view like a fused qkv output
    k = rand(B, Hk, S, D, dtype=dtype)
    v = rand(B, Hk, S, D, dtype=dtype)
    ql = torch.tensor(q_lens, dtype=torch.int32, device=DEV)
    sp = torch.tensor(start_pos, dtype=torch.int32, device=DEV)
    return q, k, v, sp, ql


PREFILL_CASES = [  # B, T, Hq, Hk, D, S, q_lens, start_pos
    (1, 1, 2, 2, 64, 40, [1], [17]),
    (1, 5, 4, 2, 128, 64, [5], [0]),
    (3, 5, 4, 1, 64, 48, [5, 2, 0], [0, 30, 7]),
    (3, 17, 8, 2, 128, 100, [17, 9, 1], [40, 0, 99]),
    (2, 17, 7, 1, 64, 64, [17, 12], [3, 47]),
    (1, 17, 4, 4, 80, 32, [17], [15]),
    (1, 33, 2, 1, 32, 50, [30], [10]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "B{}T{}Hq{}Hk{}D{}S{}".format(*c[:6]))
def test_attention_prefill(case: tuple, dtype: torch.dtype) -> None:
    B, T, Hq, Hk, D, S, q_lens, start_pos = case
    q, k, v, sp, ql = _prefill_inputs(B, T, Hq, Hk, D, S, dtype, q_lens, start_pos)
    scale = D ** -0.5
    out = attention_prefill(q, k, v, sp, ql, scale)
    assert out.shape == (B, T, Hq, D) and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, attention_prefill_ref(q, k, v, sp, ql, scale)) < TOL[dtype]
    for b, n in enumerate(q_lens):
        assert bool((out[b, n:] == 0).all()), f"padding rows of sequence {b} not zero"


def test_attention_prefill_bad_inputs() -> None:
    q, k, v, sp, ql = _prefill_inputs(2, 4, 4, 2, 64, 16, torch.float16, [4, 4], [0, 0])
    with pytest.raises(ValueError, match="multiple of Hk"):
        attention_prefill(q[:, :, :3], k, v, sp, ql, 0.1)
    with pytest.raises(ValueError, match="k_cache must be"):
        attention_prefill(q, k[..., :32], v, sp, ql, 0.1)
    with pytest.raises(ValueError, match="dtype mismatch: v_cache"):
        attention_prefill(q, k, v.float(), sp, ql, 0.1)
    with pytest.raises(ValueError, match="q_lens must be int32"):
        attention_prefill(q, k, v, sp, ql.long(), 0.1)
    with pytest.raises(ValueError, match="start_pos must be a 1-D"):
        attention_prefill(q, k, v, sp[:1], ql, 0.1)
    with pytest.raises(ValueError, match="unit stride along D"):
        attention_prefill(q.transpose(2, 3), k, v, sp, ql, 0.1)
    with pytest.raises(ValueError, match=r"q must be \[B, T, Hq, D\]"):
        attention_prefill(q[0], k, v, sp, ql, 0.1)


# -------------------------------------------------------- decode attention ----

# --------------------------------------------------- real shapes, CUDA only ----

QWEN_LINEAR = [(896, 1152), (896, 4864), (1536, 2048), (3584, 4608), (3584, 3584),
               (3584, 37888), (18944, 3584), (5120, 7168), (8192, 10240), (8192, 8192)]


@needs_cuda
@pytest.mark.parametrize("M", [1, 8, 32, 64, 65, 2048])
@pytest.mark.parametrize("K,N", QWEN_LINEAR)
def test_linear_qwen_shapes(M: int, K: int, N: int) -> None:
    x = rand(M, K, dtype=torch.bfloat16)
    w = rand(N, K, dtype=torch.bfloat16, scale=K ** -0.5)
    bias = rand(N, dtype=torch.bfloat16)
    assert rel_err(linear(x, w, bias), linear_ref(x, w, bias)) < 1e-2


@needs_cuda
@pytest.mark.parametrize("M", [1, 8, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head(M: int, dtype: torch.dtype) -> None:
    x = rand(M, 3584, dtype=dtype)
    w = rand(152064, 3584, dtype=dtype, scale=3584 ** -0.5)
    assert rel_err(linear(x, w), linear_ref(x, w)) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_prefill_2048(D: int, dtype: torch.dtype) -> None:
    q, k, v, sp, ql = _prefill_inputs(2, 2048, 28, 4, D, 4096, dtype, [2048, 1000], [0, 3000])
    out = attention_prefill(q, k, v, sp, ql, D ** -0.5)
    assert rel_err(out, attention_prefill_ref(q, k, v, sp, ql, D ** -0.5)) < TOL[dtype]
    assert bool((out[1, 1000:] == 0).all())
