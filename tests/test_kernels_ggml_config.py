"""Tests for ggml_gemv's launch override (kernels/ggml_gemv.py ``config=``): BLOCK_N, num_warps,
num_stages and split-K, as bench/probe_qkernels.py --ggml-sweep passes them.

Without CUDA the kernel runs under TRITON_INTERPRET=1 on small odd shapes: N not a multiple of any
BLOCK_N, split counts that do not divide the row's steps and counts above them (idle programs).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.ggml_blocks import dequant_ref  # noqa: E402
from kernels.ggml_common import INTERPRET  # noqa: E402
from kernels import ggml_gemv as gemv_mod  # noqa: E402
from kernels.ggml_gemv import check_config, ggml_gemv, launch_meta  # noqa: E402

from tests.kernel_utils import DEV, MATMUL_TOL, randn, rel_err  # noqa: E402
from tests.test_kernels_ggml import QTYPES, k_for, weights  # noqa: E402

# K 768: 3 K-quant super-blocks; legacy types 288 = 9 blocks of 32, 2 steps of 8 (the last partial)
CONFIGS = [{"BLOCK_N": 8, "num_warps": 2}, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
           {"BLOCK_N": 16, "SPLIT_K": 2}, {"BLOCK_N": 64, "num_warps": 8, "SPLIT_K": 4},
           {"BLOCK_N": 16, "num_warps": 8, "maxnreg": 96}]
# M = 1: FMA path; 5 / 17 bf16 / fp16: dot path (BLOCK_M 16 / 32); 3 fp32: FMA per row
CASES = [(1, torch.bfloat16), (5, torch.float16), (17, torch.bfloat16), (3, torch.float32)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("M,dtype", CASES, ids=str)
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_override_matches_reference(qtype: str, M: int, dtype: torch.dtype, config: dict) -> None:
    N, K = 37, k_for(qtype, 768)
    b = weights(qtype, N, K, seed=M)
    x, bias = randn(M, K, dtype=dtype), randn(N, dtype=dtype, scale=0.1)
    ref = x.float() @ dequant_ref(b, qtype, K).T + bias.float()
    out = ggml_gemv(x, b, qtype, bias=bias, config=config)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < MATMUL_TOL[dtype]


@pytest.mark.parametrize("qtype", ["q6_k", "q8_0"])
def test_split_k_into_a_column_slice(qtype: str) -> None:
    """Split-K rounds its fp32 sum into out's columns only; other columns stay untouched."""
    M, N, K = 4, 24, k_for(qtype, 768)
    b = weights(qtype, N, K, seed=5)
    x = randn(M, K + 32, dtype=torch.float16)[:, 16:16 + K]
    fused = torch.full((M, 60), -3.0, device=DEV, dtype=torch.float16)
    got = ggml_gemv(x, b, qtype, out=fused[:, 20:20 + N], config={"SPLIT_K": 3, "BLOCK_N": 8})
    assert got.data_ptr() == fused[:, 20:].data_ptr()
    ref = x.float() @ dequant_ref(b, qtype, K).T
    assert rel_err(fused[:, 20:20 + N], ref) < MATMUL_TOL[torch.float16]
    assert (fused[:, :20] == -3).all() and (fused[:, 20 + N:] == -3).all()


def test_split_k_each_split_counts_once() -> None:
    """With x = 1 on one super-block and 0 elsewhere, out is that block's row sums, whichever split owns it."""
    N, K = 9, 1024
    b = weights("q4_k", N, K, seed=2)
    w = dequant_ref(b, "q4_k", K)
    for sb in range(4):
        x = torch.zeros(1, K, device=DEV, dtype=torch.float32)
        x[0, 256 * sb:256 * (sb + 1)] = 1.0
        for split in (2, 3, 4):
            got = ggml_gemv(x, b, "q4_k", config={"SPLIT_K": split})
            torch.testing.assert_close(got[0], w[:, 256 * sb:256 * (sb + 1)].sum(1), rtol=1e-5, atol=1e-6)


def test_no_config_keeps_the_fixed_launch() -> None:
    """config=None and {} launch the fixed guesses (the engine's path), bit for bit alike."""
    for m, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (4, torch.float32)):
        meta, warps = launch_meta("q4_k", m, dtype, has_bias=True)
        assert (meta["BLOCK_N"], warps, meta["SPLIT_K"], meta["HAS_BIAS"]) == (32 if INTERPRET else 16, 8, 1, True)
        assert launch_meta("q4_k", m, dtype, True, {}) == (meta, warps)
    split_meta, _ = launch_meta("q4_k", 4, torch.bfloat16, True, {"SPLIT_K": 2})
    assert not split_meta["HAS_BIAS"]  # the launcher adds the bias after the fp32 sum
    N, K = 20, 512
    b, x = weights("q6_k", N, K), randn(3, K, dtype=torch.bfloat16)
    bias = randn(N, dtype=torch.bfloat16)
    assert torch.equal(ggml_gemv(x, b, "q6_k", bias=bias), ggml_gemv(x, b, "q6_k", bias=bias, config={}))


@pytest.mark.parametrize("config,match", [
    ({"BLOCK": 16}, "keys among"), ([("BLOCK_N", 16)], "keys among"), ({"BLOCK_N": 12}, "BLOCK_N=12"),
    ({"BLOCK_N": 4}, "BLOCK_N=4"), ({"BLOCK_N": 256}, "BLOCK_N=256"), ({"num_warps": 3}, "num_warps=3"),
    ({"num_stages": 0}, "num_stages=0"), ({"SPLIT_K": 0}, "SPLIT_K=0"), ({"SPLIT_K": 65}, "SPLIT_K=65"),
    ({"BLOCK_N": 16.0}, "must be an int"), ({"SPLIT_K": True}, "must be an int"), ({"maxnreg": 20}, "maxnreg=20"),
    ({"maxnreg": 100}, "maxnreg=100"), ({"maxnreg": 256}, "maxnreg=256"),
])
def test_bad_config_is_rejected(config, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_config(config)
    with pytest.raises(ValueError, match=match):
        ggml_gemv(randn(1, 256, dtype=torch.float16), weights("q4_k", 8, 256), "q4_k", config=config)



def compile_sweep_sm90(qtypes: tuple[str, ...] = ("q4_k", "q6_k"), ms: tuple[int, ...] = (1, 16)) -> None:
    """Print sm_90 resource usage of bench/ggml_sweep.py's BLOCK_N x num_warps candidates (and SPLIT_K 2
    at 4 warps) for bf16 x (run with TRITON_INTERPRET=0): one line ``qtype M=m config: usage`` each."""
    from bench.ggml_sweep import BLOCK_NS, WARPS, cfg_str
    from tests.test_kernels_ggml import PTR, _sm90_usage

    cands = [{"BLOCK_N": b, "num_warps": w} for b in BLOCK_NS for w in WARPS]
    cands += [{"BLOCK_N": b, "num_warps": 4, "SPLIT_K": 2} for b in BLOCK_NS]
    ptrs = {"x_ptr": PTR[torch.bfloat16], "blk": "*u8", "h": "*fp16", "bias_ptr": PTR[torch.bfloat16],
            "out_ptr": PTR[torch.bfloat16]}
    for qtype in qtypes:
        for m in ms:
            for cfg in cands:
                meta, warps = launch_meta(qtype, m, torch.bfloat16, True, cfg)
                p = {**ptrs, "out_ptr": "*fp32"} if meta["SPLIT_K"] > 1 else ptrs
                print(f"{qtype} M={m} {cfg_str(cfg)}:", _sm90_usage(gemv_mod._ggml_gemv_kernel, p, meta, warps),
                      flush=True)
