"""kernels/qdequant.py (packed weight -> dense rows) and kernels/qlinear.py's dense prefill path.

Operands are packed by compressed-tensors (tests/test_kernels_quant.py's ``packed``, not our packer).
Without CUDA the kernels run under TRITON_INTERPRET=1 on small odd shapes: N not a multiple of the
32-row tile, K tails against the 256-wide tile, every scale mode (G a multiple of the tile or per
channel, G dividing it, G = 96 / 48 gathered per element), zeros, symmetric and additive mins,
int4 and int8, bf16 / fp16 / fp32 outputs and an output that is a row slice of a wider tile.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels import qlinear as qlinear_mod  # noqa: E402
from kernels.qdequant import qdequant, qdequant_ref  # noqa: E402
from kernels.qgemm import qgemm_ref  # noqa: E402
from kernels.quant_common import scale_mode  # noqa: E402

from tests.kernel_utils import DEV, MATMUL_TOL, randn, rel_err  # noqa: E402
from tests.test_kernels_quant import packed, with_mins  # noqa: E402

# (N, K, G): tile-sized G (256, per channel K), G dividing the tile (32, 128), gathered G (96, 48), K tails
SHAPES = [(45, 256, 128), (33, 512, 256), (17, 200, 200), (40, 288, 96), (64, 320, 32), (70, 576, 48)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,form", [(4, "zeros"), (4, "sym"), (8, "zeros"), (8, "sym"), (4, "mins"), (8, "mins")])
@pytest.mark.parametrize("N,K,G", SHAPES)
def test_dense_rows_equal_the_reference(N: int, K: int, G: int, bits: int, form: str, dtype: torch.dtype) -> None:
    if form == "mins":
        q, s, m = with_mins(N, K, G, bits, torch.float16)
        z = None
    else:
        q, s, z = packed(N, K, G, bits, sym=form == "sym")
        m = None
    out = qdequant(q, s, z, bits, dtype, mins=m)
    ref = qdequant_ref(q, s, z, bits, m)
    assert out.shape == (N, K) and out.dtype == dtype
    # the same fp32 arithmetic, then one rounding to dtype (the interpreter may truncate where the GPU rounds)
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-7)


def test_every_scale_mode_is_reached() -> None:
    assert {scale_mode(g, k, 256) for _, k, g in SHAPES} == {0, 1, 2}


def test_rows_written_into_a_slice_of_a_wider_tile() -> None:
    N, K, G, bits = 40, 256, 64, 4
    q, s, z = packed(N, K, G, bits, sym=False, seed=3)
    tile = torch.full((64, K + 32), 7.0, dtype=torch.float32, device=DEV)
    view = tile[8:8 + N, :K]  # row stride K + 32: only its [N, K] cells change
    assert qdequant(q, s, z, bits, out=view) is view
    assert torch.equal(view, qdequant_ref(q, s, z, bits))
    assert (tile[:8] == 7).all() and (tile[8 + N:] == 7).all() and (tile[:, K:] == 7).all()


@pytest.mark.parametrize("bits,form", [(4, "zeros"), (8, "sym"), (4, "mins")])
@pytest.mark.parametrize("c0,c1,G", [(128, 384, 128), (0, 256, 64), (96, 288, 96), (256, 512, 256)])
def test_a_column_slice_of_the_packed_weight(c0: int, c1: int, G: int, bits: int, form: str) -> None:
    """Columns c0:c1 of a weight from its packed operands' column slices (row strides of the whole weight):
    the same values as the whole weight's dense columns (a chunked MLP's piece of down_proj)."""
    N, K, per = 40, 768, 32 // bits
    if form == "mins":
        q, s, m = with_mins(N, K, G, bits, torch.float16)
        z = None
    else:
        q, s, z = packed(N, K, G, bits, sym=form == "sym", seed=5)
        m = None
    g = slice(c0 // G, c1 // G)
    out = qdequant(q[:, c0 // per:c1 // per], s[:, g], None if z is None else z[:, g], bits, torch.float32,
                   mins=None if m is None else m[:, g])
    torch.testing.assert_close(out, qdequant_ref(q, s, z, bits, m)[:, c0:c1], rtol=1e-6, atol=1e-7)


def test_bad_inputs_name_what_to_fix() -> None:
    q, s, z = packed(24, 128, 32, 4, sym=False)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        qdequant(q, s, z, 3)
    with pytest.raises(ValueError, match="out must be"):
        qdequant(q, s, z, 4, out=torch.empty(24, 64, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        qdequant(q, s, z, 4, out=torch.empty(128, 24, device=DEV).T)  # K not unit stride
    with pytest.raises(ValueError, match="zeros must match scales"):
        qdequant(q, s, z[:, :2], 4)
    with pytest.raises(ValueError, match="zeros or mins, not both"):
        qdequant(q, s, z, 4, mins=z)
    with pytest.raises(ValueError, match="scales must be"):
        qdequant(q, s[:, :3], None, 4)
    with pytest.raises(ValueError, match="unit stride along K"):
        qdequant(q.T.contiguous().T, s, z, 4)
    with pytest.raises(ValueError, match="row stride"):
        qdequant(q, s, torch.cat([z, z], 1)[:, :z.shape[1]], 4)


@pytest.mark.parametrize("tile_rows", [None, 256, 16])  # one tile; tiles of 256 rows; tiles smaller than 256
@pytest.mark.parametrize("bias,perm", [(False, False), (True, True)])
def test_dense_path_equals_the_fused_reference(tile_rows, bias: bool, perm: bool) -> None:
    """qlinear at M >= DENSE_MIN_M: the weight widened tile by tile, each through the dense GEMM."""
    M, K, N, G, bits = qlinear_mod.DENSE_MIN_M, 64, 600, 32, 4
    q, s, z = packed(N, K, G, bits, sym=False, sdtype=torch.float32, seed=11)
    x = randn(M, K, dtype=torch.float32)
    b = randn(N, dtype=torch.float32) if bias else None
    p = torch.randperm(K, generator=torch.Generator().manual_seed(2)).to(torch.int32).to(DEV) if perm else None
    tile_bytes = qlinear_mod.TILE_BYTES if tile_rows is None else tile_rows * K * 4
    out = qlinear_mod.qlinear(x.view(2, M // 2, K), q, s, z, bits, b, p, tile_bytes=tile_bytes)
    assert out.shape == (2, M // 2, N)
    assert rel_err(out.reshape(M, N), qgemm_ref(x, q, s, z, bits, b, p)) < MATMUL_TOL[torch.float32]


def test_tiles_share_one_gemm_shape(monkeypatch) -> None:
    """As few equal tiles as fit (rows a multiple of 8): every GEMM of a weight has one shape (one tuning),
    each writes its columns of the output in place; the last tile ends at the last row, overlapping the one
    before (gate_up of Qwen2.5-7B at 64 MiB: 5 tiles of 7584 rows for 37888)."""
    shapes, starts, base = [], [], []
    real = qlinear_mod.linear

    def spy(x, w, b=None, out=None):  # where each GEMM writes: columns from the first tile's (column 0)
        base.append(out.data_ptr()) if not base else None
        shapes.append(tuple(w.shape))
        starts.append((out.data_ptr() - base[0]) // out.element_size())
        assert out.shape == (x.shape[0], w.shape[0]) and out.stride() == (N, 1)
        return real(x, w, b, out=out)
    monkeypatch.setattr(qlinear_mod, "linear", spy)
    M, K, N, G, bits = 300, 64, 600, 32, 4
    q, s, z = packed(N, K, G, bits, sym=False, sdtype=torch.float32, seed=12)
    x, b = randn(M, K, dtype=torch.float32), randn(N, dtype=torch.float32)
    ref = qgemm_ref(x, q, s, z, bits, b)
    out = qlinear_mod.dense_qlinear(x, q, s, z, bits, b, tile_bytes=250 * K * 4)  # at most 250 rows a tile
    assert shapes == [(200, K)] * 3 and starts == [0, 200, 400]  # 600 rows: 3 tiles of 200
    assert rel_err(out, ref) < MATMUL_TOL[torch.float32]
    shapes.clear(), starts.clear(), base.clear()
    out = qlinear_mod.dense_qlinear(x, q, s, z, bits, b, tile_bytes=160 * K * 4)
    assert shapes == [(152, K)] * 4  # 4 tiles of 150 rows would not be 8-aligned: 152 (608 for 600)
    assert starts == [0, 152, 304, 448]  # the last one ends at row 600
    assert rel_err(out, ref) < MATMUL_TOL[torch.float32]


def test_dispatch_by_rows(monkeypatch) -> None:
    """<= 64 rows: qgemv; up to DENSE_MIN_M: the fused qgemm; from there: dequantize + dense GEMM."""
    calls = []
    monkeypatch.setattr(qlinear_mod, "qgemv", lambda *a, **k: calls.append("qgemv") or torch.zeros(a[0].shape[0], 8))
    monkeypatch.setattr(qlinear_mod, "qgemm", lambda *a, **k: calls.append("qgemm") or torch.zeros(a[0].shape[0], 8))
    monkeypatch.setattr(qlinear_mod, "dense_qlinear",
                        lambda *a, **k: calls.append("dense") or torch.zeros(a[0].shape[0], 8))
    q = torch.zeros(8, 4, dtype=torch.int32)
    for m in (1, 64, 65, qlinear_mod.DENSE_MIN_M - 1, qlinear_mod.DENSE_MIN_M, 2048):
        qlinear_mod.qlinear(torch.zeros(m, 32), q, torch.ones(8, 1), None, 4)
    assert calls == ["qgemv", "qgemv", "qgemm", "qgemm", "dense", "dense"]


def test_a_tile_smaller_than_a_row_is_refused() -> None:
    q, s, z = packed(24, 128, 32, 4, sym=False)
    with pytest.raises(ValueError, match="cannot hold one weight row"):
        qlinear_mod.dense_qlinear(randn(300, 128, dtype=torch.float32), q, s, z, 4, tile_bytes=100)


def compile_all_sm90() -> None:
    """Print sm_90 resource usage of the dequant kernel over its specializations (run with TRITON_INTERPRET=0)."""
    from kernels import qdequant as mod
    from tests.test_kernels_ggml import PTR, _sm90_usage
    for bits in (4, 8):
        for form in ("zeros", "sym", "mins"):
            for mode, group in ((0, 256), (1, 128), (2, 96)):
                for dtype in (torch.bfloat16, torch.float32):
                    meta = dict(HAS_ZEROS=form == "zeros", HAS_MINS=form == "mins", BITS=bits, BLOCK_N=mod.block_n(dtype),
                                BLOCK_K=mod.BLOCK_K, SCALE_MODE=mode, GROUP_C=group if mode == 1 else 1, EVEN_K=mode != 2)
                    ptrs = {"q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": PTR[dtype]}
                    usage = _sm90_usage(mod._qdequant_kernel, ptrs, meta, mod.NUM_WARPS)
                    print(f"int{bits} {form} mode {mode} {dtype}: {usage}")


@pytest.mark.slow
def test_the_kernel_compiles_for_sm90_without_spills() -> None:
    """The GPU build (which the interpreter never lowers) compiles for the H200's sm_90 with no stack
    and no local memory, at every specialization."""
    from tests.test_kernels_ggml import NV_BIN
    if not (NV_BIN / "cuobjdump").exists():
        pytest.skip("Triton's NVIDIA tools are not bundled")
    from tests.test_kernels_ggml import sm90_report
    lines = sm90_report("from tests.test_kernels_qdequant import compile_all_sm90 as c; c()", timeout=900)
    assert len(lines) == 2 * 3 * 3 * 2, lines
    for line in lines:
        assert "STACK:0" in line and "LOCAL:0" in line, line


@pytest.mark.parametrize("tile_rows", [None, 16])  # one tile; tiles of 16 rows (the last overlapping)
def test_dense_path_in_a_callers_tile_buffer(tile_rows) -> None:
    """qlinear's dense path in a caller's kept buffer (engine.ops_triton.TritonOps holds the plan's tile): the same
    output as with tiles of its own, the buffer's storage used (its bytes change), a buffer too small refused."""
    M, K, N, G, bits = qlinear_mod.DENSE_MIN_M, 64, 100, 32, 4
    q, s, z = packed(N, K, G, bits, sym=False, sdtype=torch.float32, seed=13)
    x, b = randn(M, K, dtype=torch.float32), randn(N, dtype=torch.float32)
    tile_bytes = N * K * 4 if tile_rows is None else tile_rows * K * 4
    buf = torch.zeros(tile_bytes + 24, dtype=torch.uint8, device=DEV)
    own = qlinear_mod.qlinear(x, q, s, z, bits, b, tile_bytes=tile_bytes)
    got = qlinear_mod.qlinear(x, q, s, z, bits, b, tile_bytes=tile_bytes, tile=buf)
    assert torch.equal(got, own) and rel_err(got, qgemm_ref(x, q, s, z, bits, b)) < MATMUL_TOL[torch.float32]
    assert bool(buf[:tile_bytes].any()) and not bool(buf[tile_bytes:].any())  # the tile's bytes, no more
    with pytest.raises(ValueError, match="tile must be a contiguous buffer of at least"):
        qlinear_mod.qlinear(x, q, s, z, bits, b, tile_bytes=tile_bytes, tile=buf[:tile_bytes - 1])


def test_triton_ops_keep_one_tile_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonOps allocates the dense tile once, at the first chunk of the dense path's rows, and every later
    long chunk decodes into it; decode rows allocate none; a new plan size drops it."""
    from engine.ops_triton import TritonOps
    from engine.quant.spec import QuantSpec, QuantWeight
    M, K, N, G = qlinear_mod.DENSE_MIN_M, 256, 200, 32
    q, s, z = packed(N, K, G, 4, sym=False, sdtype=torch.float32, seed=14)
    w = QuantWeight(qweight=q, scales=s, zeros=z, perm=None, spec=QuantSpec(bits=4, group_size=G, sym=False, fmt="awq"),
                    in_features=K)
    ops = TritonOps()
    ops.use_scratch(80 * K * 4)  # tiles of 80 rows (the plan's sizes are at least 64 KiB)
    seen = []
    real = qlinear_mod.qlinear
    monkeypatch.setattr(ops, "_qlinear", lambda *a, tile=None, **kw: seen.append(tile) or real(*a, tile=tile, **kw))
    x = randn(M, K, dtype=torch.float32)
    ops.linear(x[:8], w)
    assert seen == [None] and ops._tile is None  # decode rows: no tile
    out1, out2 = ops.linear(x, w), ops.linear(x.view(2, M // 2, K), w)
    assert seen[1] is seen[2] is ops._tile and ops._tile.numel() == 80 * K * 4
    assert torch.equal(out1, out2.view(M, N)) and rel_err(out1, qgemm_ref(x, q, s, z, 4)) < MATMUL_TOL[torch.float32]
    ops.use_scratch(70 * K * 4)
    assert ops._tile is None
    ops.linear(x, w)
    assert ops._tile.numel() == 70 * K * 4
