"""Tests for the kernels on native ggml blocks (kernels/ggml_blocks.py, ggml_dequant.py, ggml_gemv.py).

Every type's blocks are random but valid: random bytes with finite fp16 scales (every bit pattern of
codes, sub-scales and mins; tests.test_gguf_dequant.random_blocks) for the decoders, and blocks whose
mins centre every sub-block (engine.gguf.random_blocks, as trained weights) for the matmuls.  The
block-32 ("legacy") types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are also packed from floats by the gguf
package's own quantizer (it cannot quantize K-quants: NotImplementedError for Q4_K / Q5_K / Q6_K).
The torch reference is checked bit for bit against the gguf package's numpy dequantizer; the dequant
kernel against the reference rounded once; the GEMV by relative Frobenius error.  Without CUDA the
kernels run under TRITON_INTERPRET=1 on small odd shapes (legacy types at K an odd multiple of 32, as
Qwen2.5-72B's 29568: the last 8-block step of a row is partial); real shapes need a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as np_dequantize, quantize as np_quantize  # noqa: E402

from engine.gguf import random_blocks as rb  # noqa: E402
from kernels.ggml_blocks import BLOCKS, LEGACY, dequant_ref, row_bytes  # noqa: E402
from kernels import ggml_dequant as dequant_mod, ggml_gemv as gemv_mod  # noqa: E402
from kernels.ggml_dequant import ggml_dequant, ggml_dequant_ref  # noqa: E402
from kernels.ggml_gemv import ggml_gemv, ggml_gemv_ref  # noqa: E402

from tests.kernel_utils import DEV, MATMUL_TOL, needs_cuda, randn, rel_err  # noqa: E402
from tests.test_gguf_dequant import random_blocks as byte_blocks  # noqa: E402

QTYPES = {"q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K, "q8_0": QT.Q8_0, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
          "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# a test's K for a K-quant -> the legacy types' K: odd multiples of 32 (1 full step and a partial one, one
# partial step) and 15 blocks (a full and a 7-block step), so every shape masks blocks past the row
LEGACY_K = {256: 96, 768: 288, 512: 480}


def k_for(qtype: str, k: int) -> int:
    """The K a test shape uses for ``qtype``."""
    return LEGACY_K[k] if qtype in LEGACY else k


def weights(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, row_bytes] blocks on DEV decoding to centred values of std 0.02 (as trained weights)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return rb.random_blocks(QTYPES[qtype], n * k // BLOCKS[qtype][0], 0.02, gen).view(n, row_bytes(qtype, k))


def test_geometry() -> None:
    assert BLOCKS == {"q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210), "q8_0": (32, 34),
                      "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24)}
    assert row_bytes("q4_k", 3584) == 14 * 144 and row_bytes("q5_k", 768) == 528 and row_bytes("q6_k", 512) == 420
    assert row_bytes("q8_0", 29568) == 924 * 34 and row_bytes("q5_0", 96) == 66 and row_bytes("q5_1", 288) == 216
    with pytest.raises(ValueError, match="multiple"):
        row_bytes("q5_k", 300)
    with pytest.raises(ValueError, match="multiple"):
        row_bytes("q4_0", 80)
    with pytest.raises(ValueError, match="unknown ggml block type 'q2_k'"):
        row_bytes("q2_k", 256)


@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (5, 3)])
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dequant_ref_matches_gguf(qtype: str, rows: int, blocks_per_row: int) -> None:
    raw = byte_blocks(QTYPES[qtype], rows, blocks_per_row, seed=rows)
    want = torch.from_numpy(np_dequantize(raw, QTYPES[qtype]).astype(np.float32))
    k = BLOCKS[qtype][0] * blocks_per_row
    got = dequant_ref(torch.from_numpy(raw.copy()), qtype, k)
    assert got.dtype == torch.float32 and got.shape == (rows, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("K", [32, 288])
@pytest.mark.parametrize("qtype", list(LEGACY))
def test_legacy_blocks_packed_by_gguf(qtype: str, K: int) -> None:
    """Blocks of the gguf package's own quantizer decode (reference and kernel) as its dequantizer does."""
    w = np.random.default_rng(K).normal(0.0, 0.02, (7, K)).astype(np.float32)
    raw = np_quantize(w, QTYPES[qtype])
    want = torch.from_numpy(np_dequantize(raw, QTYPES[qtype]).astype(np.float32))
    assert np.abs(want.numpy() - w).max() < 0.02  # a sanity check of the round trip, not a tolerance of ours
    blocks = torch.from_numpy(raw.copy())
    torch.testing.assert_close(dequant_ref(blocks, qtype, K), want, rtol=0, atol=0)
    torch.testing.assert_close(ggml_dequant(blocks.to(DEV), qtype, K, torch.float32).cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(40, 256), (17, 768)])
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dequant_kernel_is_the_reference_rounded_once(qtype: str, N: int, K: int, dtype: torch.dtype) -> None:
    K = k_for(qtype, K)
    b = torch.from_numpy(byte_blocks(QTYPES[qtype], N, K // BLOCKS[qtype][0], seed=N)).to(DEV)
    got = ggml_dequant(b, qtype, K, dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got, ggml_dequant_ref(b, qtype, K, dtype))


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dequant_into_a_strided_out(qtype: str) -> None:
    N, K = 9, k_for(qtype, 512)
    b = weights(qtype, N, K, seed=3)
    wide = torch.full((N, K + 300), 7.0, device=DEV, dtype=torch.bfloat16)
    got = ggml_dequant(b, qtype, K, torch.bfloat16, out=wide[:, 100:100 + K])
    assert got.data_ptr() == wide[:, 100:].data_ptr()
    assert torch.equal(got, dequant_ref(b, qtype, K).to(torch.bfloat16))
    assert (wide[:, :100] == 7).all() and (wide[:, 100 + K:] == 7).all()


# (M, N, K, bias): M = 1 takes the FMA path, M >= 2 the dot path (BLOCK_M 16, 32, 64) but for fp32 x
# (FMA per row: up to M = 8 here, the interpreter runs it slowly); N below one BLOCK_N (5) and not a multiple
GEMV_SHAPES = [(1, 40, 256, True), (1, 96, 768, False), (3, 96, 512, False), (8, 40, 768, True), (17, 33, 512, True),
               (64, 5, 256, False)]
GEMV_CASES = [(*shape, dtype) for shape in GEMV_SHAPES for dtype in X_DTYPES if dtype != torch.float32 or shape[0] <= 8]


@pytest.mark.parametrize("M,N,K,bias,dtype", GEMV_CASES)
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_gemv_matches_reference(qtype: str, M: int, N: int, K: int, bias: bool, dtype: torch.dtype) -> None:
    K = k_for(qtype, K)
    b = weights(qtype, N, K, seed=M + N)
    x = randn(M, K, dtype=dtype)
    bvec = randn(N, dtype=dtype, scale=0.1) if bias else None
    out = ggml_gemv(x, b, qtype, bias=bvec)
    assert out.shape == (M, N) and out.dtype == dtype
    ref = x.float() @ dequant_ref(b, qtype, K).T + (bvec.float() if bias else 0.0)
    assert rel_err(out, ref) < MATMUL_TOL[dtype]
    assert rel_err(ggml_gemv_ref(x, b, qtype, bvec), ref) < MATMUL_TOL[dtype]


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_gemv_into_a_column_slice(qtype: str, M: int) -> None:
    """A fused projection's part: out is columns 24..64 of a wider [M, 100] output, x a row-strided view."""
    N, K = 40, k_for(qtype, 512)
    b = weights(qtype, N, K, seed=7)
    x = randn(M, K + 64, dtype=torch.float16)[:, 32:32 + K]
    fused = torch.full((M, 100), -3.0, device=DEV, dtype=torch.float16)
    got = ggml_gemv(x, b, qtype, out=fused[:, 24:24 + N])
    assert got.data_ptr() == fused[:, 24:].data_ptr()
    assert rel_err(fused[:, 24:24 + N], ggml_gemv_ref(x, b, qtype).float()) < MATMUL_TOL[torch.float16]
    assert (fused[:, :24] == -3).all() and (fused[:, 24 + N:] == -3).all()


def _odd_address(qtype: str) -> torch.Tensor:
    buf = torch.zeros(2 * row_bytes(qtype, 256) + 1, dtype=torch.uint8, device=DEV)
    return buf[1:].view(2, row_bytes(qtype, 256))


@pytest.mark.parametrize("case,match", [
    ("x_int", "unsupported x dtype"), ("k_300", "multiple"), ("row_bytes", r"uint8 \[N >= 1, 144\]"),
    ("m_65", "1..64 rows"), ("blocks_f16", "must be uint8"), ("strided_blocks", "contiguous"),
    ("odd_address", "2-byte aligned"), ("out_dtype", "out must be"), ("out_stride", "unit stride"),
    ("bias_shape", "bias must be"), ("qtype", "unknown ggml block type"), ("x_1d", "2-D"),
    ("k_80_q8_0", "multiple"), ("row_bytes_q5_0", r"uint8 \[N >= 1, 66\] \(K / 32 blocks of 22 bytes"),
])
def test_gemv_rejects_bad_operands(case: str, match: str) -> None:
    x, b = randn(2, 256, dtype=torch.float16), weights("q4_k", 8, 256)
    args = {"x_int": (x.to(torch.int32), b, "q4_k"), "k_300": (randn(1, 300, dtype=torch.float16), b, "q4_k"),
            "row_bytes": (x, b[:, :100], "q4_k"), "m_65": (randn(65, 256, dtype=torch.float16), b, "q4_k"),
            "blocks_f16": (x, b.view(torch.float16), "q4_k"), "qtype": (x, b, "q2_k"), "x_1d": (x[0], b, "q4_k"),
            "k_80_q8_0": (randn(1, 80, dtype=torch.float16), weights("q8_0", 8, 64), "q8_0"),
            "row_bytes_q5_0": (randn(1, 96, dtype=torch.float16), weights("q5_0", 8, 64), "q5_0"),
            "strided_blocks": (x, weights("q4_k", 16, 256)[::2], "q4_k"), "odd_address": (x, _odd_address("q4_k"), "q4_k")}
    kwargs = {"out_dtype": {"out": torch.empty(2, 8, device=DEV)},
              "out_stride": {"out": torch.empty(8, 2, device=DEV, dtype=torch.float16).T},
              "bias_shape": {"bias": torch.zeros(9, device=DEV, dtype=torch.float16)}}
    with pytest.raises(ValueError, match=match):
        ggml_gemv(*args.get(case, (x, b, "q4_k")), **kwargs.get(case, {}))


@pytest.mark.parametrize("args,match", [
    ((torch.int8,), "unsupported output dtype"), ((torch.float16, 512), r"uint8 \[N >= 1, 288\]"),
    ((torch.float16, 256, "out"), "out must be"),
])
def test_dequant_rejects_bad_operands(args: tuple, match: str) -> None:
    b = weights("q4_k", 4, 256)
    dtype, k = args[0], args[1] if len(args) > 1 else 256
    out = torch.empty(4, 256, device=DEV) if len(args) > 2 else None
    with pytest.raises(ValueError, match=match):
        ggml_dequant(b, "q4_k", k, dtype, out=out)


@needs_cuda
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_real_shapes_cuda(qtype: str, M: int) -> None:
    """Qwen2.5-7B's MLP up / gate shape (K 3584, N 18944) and its down projection (K 18944, N 3584);
    the legacy types also Qwen2.5-72B's down projection (K 29568 = 924 blocks of 32, N 8192), which
    llama.cpp stores as Q5_0 / Q8_0 in a Q4_K_M file."""
    for N, K in ((18944, 3584), (3584, 18944), *([(8192, 29568)] if qtype in LEGACY else [])):
        b = weights(qtype, N, K, seed=M)
        x, bias = randn(M, K, dtype=torch.bfloat16), randn(N, dtype=torch.bfloat16, scale=0.1)
        ref = x.float() @ dequant_ref(b, qtype, K).T + bias.float()
        assert rel_err(ggml_gemv(x, b, qtype, bias=bias), ref) < MATMUL_TOL[torch.bfloat16]
        assert torch.equal(ggml_dequant(b, qtype, K, torch.bfloat16), dequant_ref(b, qtype, K).to(torch.bfloat16))


PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def sm90_report(code: str, timeout: int = 600) -> list[str]:
    """The stdout lines of ``python -c code`` run with the real compiler (TRITON_INTERPRET=0, this repository on
    the path): the sm_90 builds' reports, which a process that imported Triton under the interpreter cannot make."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def _sm90_usage(fn, ptrs: dict[str, str], meta: dict, warps: int) -> str:
    """Compile ``fn`` for sm_90 on the CPU (Triton's bundled ptxas) and return cuobjdump's resource line."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {a: "constexpr" if a in meta else ptrs.get(a, "i32") for a in names}
    src = ASTSource(fn, sig, constexprs={(names.index(a),): v for a, v in meta.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(NV_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
    return next(line.strip() for line in out.splitlines() if "REG:" in line)


def compile_all_sm90() -> None:
    """Print the resource usage of every launch config the tests' shapes reach (run with TRITON_INTERPRET=0)."""
    for qtype in QTYPES:
        for m, dtype in ((1, torch.bfloat16), (8, torch.float16), (64, torch.bfloat16), (4, torch.float32)):
            meta, warps = gemv_mod.launch_meta(qtype, m, dtype, has_bias=True)
            ptrs = {"x_ptr": PTR[dtype], "blk": "*u8", "h": "*fp16", "bias_ptr": PTR[dtype], "out_ptr": PTR[dtype]}
            print(f"gemv {qtype} M={m} {dtype}:", _sm90_usage(gemv_mod._ggml_gemv_kernel, ptrs, meta, warps))
        for dtype in (torch.bfloat16, torch.float32):
            meta, warps = dequant_mod.launch_meta(qtype, dtype)
            ptrs = {"blk": "*u8", "h": "*fp16", "out_ptr": PTR[dtype]}
            print(f"dequant {qtype} {dtype}:", _sm90_usage(dequant_mod._ggml_dequant_kernel, ptrs, meta, warps))


@pytest.mark.slow
@pytest.mark.skipif(not (NV_BIN / "cuobjdump").exists(), reason="Triton's NVIDIA tools are not bundled")
def test_kernels_compile_for_sm90_without_spills() -> None:
    """The GPU build of every launch config (which the interpreter never lowers) compiles for the
    H200's sm_90 and keeps its registers: no stack, no local memory (spills)."""
    lines = sm90_report("from tests.test_kernels_ggml import compile_all_sm90 as c; c()")
    assert len(lines) == 6 * len(QTYPES), lines
    for line in lines:
        assert "STACK:0" in line and "LOCAL:0" in line, line
