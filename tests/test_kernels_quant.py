"""Tests for the quantized matmuls (kernels/qgemv.py, kernels/qgemm.py, kernels/qlinear.py).

Operands are built from random codes packed by compressed-tensors' ``pack_to_int32`` (an
implementation of the same packing that is not ours: dense along K, element i at bit i * bits,
unsigned after its +2**(bits-1) offset). Without CUDA the kernels run under TRITON_INTERPRET=1
on small odd shapes with pinned configs that reach every scale mode: one group per tile (G a
multiple of BLOCK_K, per channel), several groups per tile (G divides BLOCK_K) and the per-element
gather (G = 96 against a 64-wide tile), with K tails, N not a multiple of BLOCK_N and odd group
counts. Every check compares with the fp32 reference by relative Frobenius error.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402

from kernels import qgemm as qgemm_mod  # noqa: E402
from kernels import qgemv as qgemv_mod  # noqa: E402
from kernels.qgemm import _qgemm, qgemm_ref  # noqa: E402
from kernels.qgemv import _qgemv, qgemv_ref  # noqa: E402
from kernels.qlinear import qlinear  # noqa: E402
from kernels.quant_common import dequant_ref, scale_mode  # noqa: E402

from tests.kernel_utils import DEV, MATMUL_TOL, needs_cuda, randn, rel_err  # noqa: E402


def packed(n: int, k: int, g: int, bits: int, sym: bool, sdtype=torch.float16, seed: int = 0):
    """Random (qweight, scales, zeros) in the canonical layout, packed by compressed-tensors."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    qweight = pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(sdtype)
    zeros = None if sym else torch.randint(0, (1 << bits) + 1, (n, k // g), generator=gen).to(sdtype)
    return qweight.to(DEV), scales.to(DEV), None if zeros is None else zeros.to(DEV)


def test_scale_modes() -> None:
    assert scale_mode(128, 4096, 64) == 0 and scale_mode(200, 200, 64) == 0  # tile inside one group
    assert scale_mode(32, 4096, 128) == 1 and scale_mode(64, 192, 64) == 0
    assert scale_mode(96, 384, 64) == 2 and scale_mode(48, 384, 64) == 2  # G not a power of 2


# (M, K, N, G): K/G odd (3, 5), K tails against 64/128-wide tiles, N odd, per channel (G = K = 200)
GEMV_SHAPES = [(1, 192, 45, 64), (3, 160, 40, 32), (1, 384, 33, 128), (5, 200, 17, 200), (2, 288, 24, 96)]
GEMV_CFGS = {"default": None, "fma-bk128": qgemv_mod.config(8, 128), "split4": qgemv_mod.config(16, 64, 4),
             "swap": qgemv_mod.config(16, 64, swap=True)}


@pytest.mark.parametrize("cfg", list(GEMV_CFGS))
@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("M,K,N,G", GEMV_SHAPES)
def test_qgemv_small(M: int, K: int, N: int, G: int, bits: int, sym: bool, cfg: str) -> None:
    q, s, z = packed(N, K, G, bits, sym)
    x = randn(M, K, dtype=torch.float32)
    out = _qgemv(x, q, s, z, bits, cfg=GEMV_CFGS[cfg])
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert rel_err(out, qgemv_ref(x, q, s, z, bits)) < MATMUL_TOL[torch.float32]


@pytest.mark.parametrize("xdtype,sdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("M", [1, 7])
def test_qgemv_half_bias_perm(M: int, xdtype: torch.dtype, sdtype: torch.dtype) -> None:
    K, N, G, bits = 256, 40, 64, 4
    q, s, z = packed(N, K, G, bits, sym=False, sdtype=sdtype, seed=1)
    x, bias = randn(M, K, dtype=xdtype), randn(N, dtype=xdtype)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(2)).to(torch.int32).to(DEV)
    out = _qgemv(x, q, s, z, bits, bias, perm, cfg=qgemv_mod.config(16, 64, 2))
    assert out.dtype == xdtype
    assert rel_err(out, qgemv_ref(x, q, s, z, bits, bias, perm)) < MATMUL_TOL[xdtype]
    # the permutation means: packed column j holds input channel perm[j]
    w_packed = dequant_ref(q, s, z, bits)
    w_orig = torch.empty_like(w_packed)
    w_orig[:, perm.long()] = w_packed
    assert rel_err(out, x.float() @ w_orig.T + bias.float()) < MATMUL_TOL[xdtype]


# (M, K, N, G): M past one tile and not a multiple of it, the gather mode (G = 96), per channel
GEMM_SHAPES = [(70, 192, 45, 64), (33, 160, 40, 32), (97, 200, 24, 200), (65, 288, 17, 96), (40, 256, 64, 128)]
GEMM_CFGS = {"default": None, "bk32": qgemm_mod.config(32, 16, 32, 2), "bk128": qgemm_mod.config(16, 32, 128)}


@pytest.mark.parametrize("cfg", list(GEMM_CFGS))
@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("M,K,N,G", GEMM_SHAPES)
def test_qgemm_small(M: int, K: int, N: int, G: int, bits: int, sym: bool, cfg: str) -> None:
    q, s, z = packed(N, K, G, bits, sym, seed=3)
    x = randn(M, K, dtype=torch.float32)
    out = _qgemm(x, q, s, z, bits, cfg=GEMM_CFGS[cfg])
    assert out.shape == (M, N)
    assert rel_err(out, qgemm_ref(x, q, s, z, bits)) < MATMUL_TOL[torch.float32]


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_qgemm_half_bias_perm(xdtype: torch.dtype) -> None:
    M, K, N, G, bits = 70, 256, 40, 128, 8
    q, s, z = packed(N, K, G, bits, sym=True, sdtype=xdtype, seed=4)
    x, bias = randn(M, K, dtype=xdtype), randn(N, dtype=xdtype)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(5)).to(torch.int32).to(DEV)
    out = _qgemm(x, q, s, z, bits, bias, perm)
    assert out.dtype == xdtype
    assert rel_err(out, qgemm_ref(x, q, s, z, bits, bias, perm)) < MATMUL_TOL[xdtype]


def with_mins(n: int, k: int, g: int, bits: int, sdtype=torch.float32, seed: int = 7):
    """Random (qweight, scales, mins) of the additive-min form (w = code * scale + min, GGUF's K-quants)."""
    q, s, _ = packed(n, k, g, bits, sym=True, sdtype=sdtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mins = (-(torch.rand(n, k // g, generator=gen) * 0.1)).to(sdtype).to(DEV)
    return q, s, mins


# (M, K, N, G): GGUF's groups (16: Q6_K, 32: the others) with K tails and odd N, and G = 48 (the gather mode)
MINS_CASES = [(1, 96, 33, 32), (3, 160, 40, 16), (2, 192, 24, 48), (70, 192, 45, 32), (65, 112, 17, 16)]


@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,K,N,G", MINS_CASES)
def test_additive_mins(M: int, K: int, N: int, G: int, bits: int, sdtype: torch.dtype) -> None:
    q, s, m = with_mins(N, K, G, bits, sdtype)
    x, bias = randn(M, K, dtype=torch.float32), randn(N, dtype=torch.float32)
    ref = x @ dequant_ref(q, s, None, bits, m).T + bias
    codes = dequant_ref(q, torch.ones_like(s), None, bits) + (1 << (bits - 1))  # the raw codes
    w = codes * s.float().repeat_interleave(G, 1) + m.float().repeat_interleave(G, 1)
    assert torch.equal(dequant_ref(q, s, None, bits, m), w)
    cfgs = [qgemv_mod.config(16, 64, 2), qgemv_mod.config(8, 16)] if M <= 64 else \
        [qgemm_mod.config(32, 16, 32, 2), qgemm_mod.config(16, 32, 128)]
    run = _qgemv if M <= 64 else _qgemm
    for cfg in cfgs:  # several groups per tile, one group per tile (BLOCK_K 16 / 32), K tails
        out = run(x, q, s, None, bits, bias, cfg=cfg, mins=m)
        assert rel_err(out, ref) < MATMUL_TOL[torch.float32], cfg
    assert rel_err(qlinear(x, q, s, None, bits, bias, mins=m), ref) < MATMUL_TOL[torch.float32]


@pytest.mark.parametrize("lead", [(1,), (2, 3), (70,)])
def test_qlinear_dispatch_leading_dims(lead: tuple[int, ...]) -> None:
    K, N, G, bits = 128, 24, 32, 4
    q, s, z = packed(N, K, G, bits, sym=False, seed=6)
    x = randn(*lead, K, dtype=torch.float32)
    out = qlinear(x, q, s, z, bits)
    assert out.shape == (*lead, N)
    assert rel_err(out.reshape(-1, N), qgemm_ref(x.reshape(-1, K), q, s, z, bits)) < MATMUL_TOL[torch.float32]


def test_bad_inputs() -> None:
    K, N, G = 128, 24, 32
    q, s, z = packed(N, K, G, 4, sym=False)
    x = randn(2, K, dtype=torch.float32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        _qgemv(x, q, s, z, 3)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[N, K/4\]"):
        _qgemv(x, q, s, z, 8)  # int4 words read as int8: K mismatch
    with pytest.raises(ValueError, match="scales must be fp16/bf16/fp32"):
        _qgemv(x, q, s.double(), None, 4)
    with pytest.raises(ValueError, match="mins must match scales"):
        _qgemv(x, q, s, z, 4, mins=s)  # zeros and mins together
    with pytest.raises(ValueError, match="mins must match scales"):
        _qgemv(x, q, s, None, 4, mins=s.float())
    with pytest.raises(ValueError, match="scales must be"):
        _qgemv(x, q, s[:, :3].contiguous(), None, 4)  # 3 groups do not divide K = 128
    with pytest.raises(ValueError, match="zeros must match scales"):
        _qgemv(x, q, s, z[:1], 4)
    with pytest.raises(ValueError, match="bias must be"):
        _qgemv(x, q, s, z, 4, bias=randn(N + 1, dtype=torch.float32))
    with pytest.raises(ValueError, match="perm must be an int32"):
        _qgemv(x, q, s, z, 4, perm=torch.arange(K - 1, device=DEV))
    with pytest.raises(ValueError, match="at most 64 rows"):
        _qgemv(randn(65, K, dtype=torch.float32), q, s, z, 4)
    with pytest.raises(ValueError, match="unit stride"):
        _qgemm(randn(K, 70, dtype=torch.float32).T, q, s, z, 4)


# Qwen2.5-7B projections (name, K, N) with AWQ's group 128
QWEN7B = [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888), ("down", 18944, 3584)]


@needs_cuda
@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
@pytest.mark.parametrize("M", [1, 8, 32])
@pytest.mark.parametrize("name,K,N", QWEN7B)
def test_qgemv_qwen_shapes_every_candidate(name: str, K: int, N: int, M: int, bits: int, sym: bool) -> None:
    q, s, z = packed(N, K, 128, bits, sym, sdtype=torch.bfloat16)
    x = randn(M, K, dtype=torch.bfloat16)
    ref = qgemv_ref(x, q, s, z, bits)
    block_m = 1 if M == 1 else max(16, 1 << (M - 1).bit_length())
    cands = qgemv_mod._candidates(block_m, N, K, torch.cuda.get_device_properties(0).multi_processor_count, 128, bits)
    for cfg in cands:
        assert rel_err(_qgemv(x, q, s, z, bits, cfg=cfg), ref) < 1e-2, f"{name} M={M}: wrong with {cfg}"


@needs_cuda
@pytest.mark.parametrize("name,K,N", QWEN7B)
def test_qgemm_qwen_shapes_every_candidate(name: str, K: int, N: int) -> None:
    q, s, z = packed(N, K, 128, 4, sym=False, sdtype=torch.bfloat16)
    x = randn(333, K, dtype=torch.bfloat16)
    ref = qgemm_ref(x, q, s, z, 4)
    for cfg in qgemm_mod._configs(128, 4):
        assert rel_err(_qgemm(x, q, s, z, 4, cfg=cfg), ref) < 1e-2, f"{name}: wrong with {cfg}"


def test_bench_operands_match_the_kernels() -> None:
    """The benchmark's random packed operands are valid kernel inputs with the intended spread."""
    from tools.bench_quant import packed_operands

    x, q, s, z = packed_operands(3, 256, 40, 4, 128, device=DEV)
    w = dequant_ref(q, s, z, 4)
    assert 0.5 < w.std().item() * 256 ** 0.5 < 1.5
    assert rel_err(_qgemv(x, q, s, z, 4), qgemv_ref(x, q, s, z, 4)) < MATMUL_TOL[torch.bfloat16]
