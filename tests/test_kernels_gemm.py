"""Tests for the prefill GEMM (kernels/gemm.py) and its TMA family (kernels/gemm_tma.py).

Without CUDA the kernels run under TRITON_INTERPRET=1, which supports host-side tensor
descriptors (TMA loads zero-fill out-of-range rows / columns / K, stores clip), so both
families are checked on small odd shapes through the private launcher ``_gemm(x, w, bias,
cfg)`` with pinned configs.  The CUDA-only tests run every tuning candidate of both families
on the real Qwen2.5-7B shapes, the tuner, the misaligned fallback and CUDA-graph capture.
Every check compares with ``gemm_ref`` (fp32) by relative Frobenius error.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels import gemm as gemm_mod  # noqa: E402
from kernels import gemm_tma  # noqa: E402
from kernels.gemm import _gemm, gemm, gemm_ref  # noqa: E402

from tests.kernel_utils import DEV, DTYPES, MATMUL_TOL as TOL, needs_cuda, randn as rand, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9
TMA_DEVICE = HOPPER or not CUDA  # the interpreter runs descriptors too




def operands(M: int, K: int, N: int, dtype: torch.dtype, bias: bool):
    return (rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=K ** -0.5),
            rand(N, dtype=dtype) if bias else None)


# ------------------------------------------------------- both families, small shapes ----

def _pointer_cfg() -> triton.Config:
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})


# small pinned configs of each TMA variant (BLOCK_K >= 16 elements: >= 32 bytes per TMA row)
FAMILIES = {
    "pointer": _pointer_cfg(),
    "tma-persistent-flatten": gemm_tma.config(32, 32, 32, persistent=True, flatten=True),
    "tma-persistent-subtile": gemm_tma.config(32, 64, 32, persistent=True, subtile=True),
    "tma-one-tile-per-program": gemm_tma.config(64, 32, 16, persistent=False),
    "tma-warp-specialized": gemm_tma.config(32, 32, 32, persistent=True, warp_spec=True),
}
# (M, K, N): M not a multiple of any tile, K not a multiple of BLOCK_K (but 16-byte rows),
# N odd (out rows not 16-byte aligned: the TMA kernel stores through pointers) or a
# multiple of 8 (TMA store); several tiles per persistent program
SHAPES = [(70, 72, 45), (97, 200, 136), (33, 40, 64)]


def _run(x, w, bias, cfg, name: str) -> torch.Tensor:
    if name != "pointer" and not TMA_DEVICE:
        pytest.skip("TMA needs CUDA capability >= 9")
    try:
        return _gemm(x, w, bias, cfg)
    except Exception as e:  # noqa: BLE001
        if CUDA and cfg.kwargs.get("WARP_SPEC"):  # optional: the tuner skips it too
            pytest.skip(f"warp-specialized config did not compile here: {type(e).__name__}")
        raise


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemm_families_small(M: int, K: int, N: int, dtype: torch.dtype, bias: bool, name: str) -> None:
    x, w, b = operands(M, K, N, dtype, bias)
    out = _run(x, w, b, FAMILIES[name], name)
    assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, gemm_ref(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gemm_families_strided_x(name: str) -> None:
    """x a column slice of a wider tensor: row stride 2K (16-byte aligned), offset base."""
    K, N = 64, 40
    big = rand(75, 2 * K, dtype=torch.bfloat16)
    x = big[:, K:]
    w = rand(N, K, dtype=torch.bfloat16, scale=K ** -0.5)
    out = _run(x, w, None, FAMILIES[name], name)
    assert rel_err(out, gemm_ref(x, w)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("col0,wide", [(0, 104), (40, 104), (24, 67)])  # 16-byte aligned rows / an odd row stride
def test_gemm_families_write_a_column_slice(name: str, col0: int, wide: int) -> None:
    """``out`` a column slice of a wider output (kernels.qlinear.tiled_linear's tiles): exactly its columns
    are written, the others keep their values (TMA stores clip to the slice's descriptor)."""
    M, K, N = 70, 72, 40
    x, w, b = operands(M, K, N, torch.bfloat16, True)
    if name != "pointer" and not TMA_DEVICE:
        pytest.skip("TMA needs CUDA capability >= 9")
    big = torch.full((M, wide), 7.0, dtype=torch.bfloat16, device=DEV)
    try:
        res = _gemm(x, w, b, FAMILIES[name], out=big[:, col0:col0 + N])  # 67: the TMA kernel stores by pointer
    except Exception as e:  # noqa: BLE001
        if CUDA and FAMILIES[name].kwargs.get("WARP_SPEC"):
            pytest.skip(f"warp-specialized config did not compile here: {type(e).__name__}")
        raise
    assert res.data_ptr() == big[:, col0:].data_ptr()
    assert rel_err(big[:, col0:col0 + N], gemm_ref(x, w, b)) < TOL[torch.bfloat16]
    rest = torch.cat((big[:, :col0], big[:, col0 + N:]), dim=1)
    assert bool((rest == 7.0).all())


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", [(70, 40), (97, 45)])  # 45: out rows not 16-byte aligned (pointer stores)
def test_gemm_families_sum_k_chunks(name: str, dtype: torch.dtype, M: int, N: int) -> None:
    """A product over K summed chunk by chunk (a chunked MLP's down projection): the weight's column slices
    (row stride K: not contiguous), the first chunk into an fp32 sum, the middle ones added to it in place, the
    last added into the output in x's dtype; equal to one GEMM over the whole K."""
    K, step = 96, 32
    x, w, b = operands(M, K, N, dtype, True)
    if name != "pointer" and not TMA_DEVICE:
        pytest.skip("TMA needs CUDA capability >= 9")
    total = torch.empty(M, N, dtype=torch.float32, device=DEV)
    out = torch.full((M, N), 7.0, dtype=dtype, device=DEV)
    try:
        _gemm(x[:, :step], w[:, :step], b, FAMILIES[name], out=total)
        _gemm(x[:, step:2 * step], w[:, step:2 * step], None, FAMILIES[name], out=total, acc=total)
        _gemm(x[:, 2 * step:], w[:, 2 * step:], None, FAMILIES[name], out=out, acc=total)
    except Exception as e:  # noqa: BLE001
        if CUDA and FAMILIES[name].kwargs.get("WARP_SPEC"):
            pytest.skip(f"warp-specialized config did not compile here: {type(e).__name__}")
        raise
    assert rel_err(out, gemm_ref(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("M", [3, 70])  # the GEMV's rows and the GEMM's
def test_linear_adds_acc(M: int) -> None:
    """``linear(..., acc=)``: the product plus a running sum, in place or into a new output."""
    from kernels.linear import linear
    x, w, b = operands(M, 32, 24, torch.bfloat16, True)
    acc = rand(M, 24, dtype=torch.float32)
    want = gemm_ref(x, w, b) + acc
    assert rel_err(linear(x, w, b, acc=acc), want) < TOL[torch.bfloat16]
    linear(x, w, b, out=acc, acc=acc)
    assert rel_err(acc, want) < TOL[torch.bfloat16]


def test_gemm_refuses_an_overlapping_or_wrong_acc() -> None:
    x, w, _ = operands(70, 32, 24, torch.float32, False)
    big = torch.zeros(70, 48, device=DEV)
    with pytest.raises(ValueError, match="not overlap"):
        gemm(x, w, out=big[:, :24], acc=big[:, 8:32])
    with pytest.raises(ValueError, match="acc must"):
        gemm(x, w, acc=torch.zeros(70, 23, device=DEV))


def test_gemm_and_linear_refuse_a_wrong_out() -> None:
    """A caller's output of the wrong shape, dtype or layout: a ValueError naming what out must be."""
    from kernels.linear import linear
    x, w, _ = operands(70, 32, 24, torch.float32, False)
    for bad in (torch.empty(70, 23, device=DEV), torch.empty(70, 24, device=DEV, dtype=torch.float16),
                torch.empty(24, 70, device=DEV).T):
        with pytest.raises(ValueError, match="out must"):
            gemm(x, w, out=bad)
        with pytest.raises(ValueError, match="out must"):
            linear(x, w, out=bad)
    with pytest.raises(ValueError, match="2-D x"):
        linear(x.view(2, 35, 32), w, out=torch.empty(70, 24, device=DEV))


@pytest.mark.parametrize("M", [3, 70])  # the GEMV's rows and the GEMM's
def test_linear_writes_out(M: int) -> None:
    from kernels.linear import linear
    x, w, b = operands(M, 32, 24, torch.float32, True)
    big = torch.zeros(M, 40, device=DEV)
    res = linear(x, w, b, out=big[:, 8:32])
    assert res.data_ptr() == big[:, 8:].data_ptr() and bool((big[:, :8] == 0).all() and (big[:, 32:] == 0).all())
    assert rel_err(big[:, 8:32], gemm_ref(x, w, b)) < TOL[torch.float32]


@pytest.mark.skipif(not TMA_DEVICE, reason="TMA needs CUDA capability >= 9")
def test_gemm_misaligned_falls_back_to_pointer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Operands TMA cannot describe: the private launcher refuses a TMA config, gemm uses pointers."""
    monkeypatch.setattr(gemm_mod, "_TUNED", {})
    K, N = 64, 48
    w = rand(N, K, dtype=torch.bfloat16, scale=K ** -0.5)
    x_off = rand(70, K + 1, dtype=torch.bfloat16)[:, 1:]  # base 2 bytes past alignment
    x_stride = rand(70, K + 3, dtype=torch.bfloat16)[:, :K]  # row stride 134 bytes
    for x in (x_off, x_stride):
        out = torch.empty(70, N, device=DEV, dtype=torch.bfloat16)
        assert not gemm_tma.eligible(x, w, out)
        with pytest.raises(ValueError, match="TMA config"):
            _gemm(x, w, None, FAMILIES["tma-persistent-flatten"])
        assert rel_err(gemm(x, w), gemm_ref(x, w)) < TOL[torch.bfloat16]
    x_odd_k = rand(70, 45, dtype=torch.bfloat16)  # K * 2 bytes = 90: w rows misaligned
    w_odd_k = rand(N, 45, dtype=torch.bfloat16, scale=45 ** -0.5)
    assert not gemm_tma.eligible(x_odd_k, w_odd_k, torch.empty(70, N, device=DEV))
    assert rel_err(gemm(x_odd_k, w_odd_k), gemm_ref(x_odd_k, w_odd_k)) < TOL[torch.bfloat16]
    # misaligned calls are cached under their own key, over the pointer family only
    assert all(k[-1] == "pointer" and not c.kwargs.get("TMA") for k, c in gemm_mod._TUNED.items())


# ------------------------------------------------------------------------- tuner ----

def test_tma_program_count_is_not_a_specialisation() -> None:
    """NUM_PROGS is the tile count below the SM count, so its divisibility by 16 changes with M inside one
    tuning bucket (the 7B AWQ's 1,200-row down tiles: 80 programs at 2,047 / 2,048 rows, 75 at 1,857); were it
    specialised, a warmed-up server would build a kernel in a live pass (it did on the H200, session 21)."""
    from triton import cdiv

    k = gemm_tma._gemm_tma_kernel  # under the interpreter a wrapper that keeps the jit's arguments
    assert list(k.kwargs["do_not_specialize"] if hasattr(k, "kwargs") else k.do_not_specialize) == ["NUM_PROGS"]
    tiles = {m: cdiv(m, 128) * cdiv(1200, 256) for m in (1857, 2047, 2048)}
    assert tiles == {1857: 75, 2047: 80, 2048: 80}  # the case above, with a 128 x 256 tile


def test_tma_candidates_fit_and_stay_few() -> None:
    for esize in (2, 4):
        cands = gemm_tma.candidates(esize)
        assert cands and len(cands) + len(gemm_mod._configs()) <= 16
        for c in cands:
            kw = c.kwargs
            assert kw["TMA"] and kw["BLOCK_K"] * esize == 128  # one 128-byte swizzle row
            epilogue = kw["BLOCK_M"] * kw["BLOCK_N"] * esize // (2 if kw["SUBTILE"] else 1)
            assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * esize \
                + epilogue <= gemm_tma._SMEM_BYTES


def test_pick_skips_failing_and_wrong_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner keeps the fastest candidate whose output agrees with the first one's."""
    right = torch.randn(40, 30)
    times = {"first": 3.0, "broken": 0.5, "wrong": 1.0, "good": 2.0, "slow": 4.0}
    out = torch.zeros(40, 30)
    last = []

    def run(cfg: triton.Config) -> None:
        last.append(cfg.kwargs["tag"])
        if last[-1] == "broken":
            raise RuntimeError("out of shared memory")
        out.copy_(-right if last[-1] == "wrong" else right)

    colds = set()

    def fake_graph_ms(fn, cold: bool = False) -> float:
        colds.add(cold)
        fn()
        return times[last[-1]]

    monkeypatch.setattr(gemm_mod, "graph_ms", fake_graph_ms)
    cands = [triton.Config({"tag": t}) for t in times]
    assert gemm_mod._pick(cands, run, out, cold=True).kwargs["tag"] == "good"
    assert last == list(times) and colds == {True}


# --------------------------------------------------- real shapes, CUDA only ----

# Qwen2.5-7B projections (name, K, N): qkv, o, gate_up, down, lm_head
QWEN7B = [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888),
          ("down", 18944, 3584), ("lm_head", 3584, 152064)]


def _family_candidates(family: str) -> list[triton.Config]:
    if family == "pointer":
        return gemm_mod._configs()
    if not HOPPER:
        pytest.skip("TMA needs CUDA capability >= 9")
    return gemm_tma.candidates(2)


@needs_cuda
@pytest.mark.parametrize("family", ["pointer", "tma"])
@pytest.mark.parametrize("M", [333, 2048])
@pytest.mark.parametrize("name,K,N", QWEN7B)
def test_gemm_qwen_shapes_every_candidate(name: str, K: int, N: int, M: int, family: str) -> None:
    """Every tuning candidate of the family is right on the real shape (or fails to compile,
    which the tuner skips: reported as a warning)."""
    x, w, b = operands(M, K, N, torch.bfloat16, bias=True)
    ref = gemm_ref(x, w, b)
    ran, failed = 0, []
    for cfg in _family_candidates(family):
        try:
            out = _gemm(x, w, b, cfg)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
            failed.append(f"{cfg}: {type(e).__name__}: {str(e)[:200]}")
            continue
        ran += 1
        assert rel_err(out, ref) < 1e-2, f"{name} M={M}: wrong result with {cfg}"
        del out
    for f in failed:
        warnings.warn(f"{name} M={M}: candidate did not run: {f}")
    assert ran > 0, f"no {family} candidate ran: {failed}"


@needs_cuda
def test_gemm_tuned_over_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(gemm_mod, "_TUNED", {})
    M, K, N = 2048, 3584, 4608
    x, w, b = operands(M, K, N, torch.bfloat16, bias=True)
    assert rel_err(gemm(x, w, b), gemm_ref(x, w, b)) < 1e-2
    (key, cfg), = gemm_mod._TUNED.items()
    assert key == (2048, N, K, torch.bfloat16, True)
    allowed = gemm_mod._configs() + (gemm_tma.candidates(2) if HOPPER else [])
    assert any(cfg.kwargs == c.kwargs and cfg.num_warps == c.num_warps
               and cfg.num_stages == c.num_stages for c in allowed)
    assert rel_err(gemm(x, w, b), gemm_ref(x, w, b)) < 1e-2  # cached config


@pytest.mark.skipif(not HOPPER, reason="TMA needs CUDA capability >= 9")
def test_gemm_tma_in_cuda_graph() -> None:
    """Host-side descriptors are by-value kernel parameters: capture and replay work."""
    M, K, N = 300, 3584, 3584
    x, w, b = operands(M, K, N, torch.bfloat16, bias=True)
    cfg = gemm_tma.candidates(2)[0]
    _gemm(x, w, b, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _gemm(x, w, b, cfg)
    x.copy_(rand(M, K, dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, gemm_ref(x, w, b)) < 1e-2


def test_the_tma_family_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERSTREAM_GEMM_TMA=0 (read at import: the module flag here): the pointer family alone, tuned under the
    pointer key, with the same result (a host-bound served pass may prefer its cheaper launch)."""
    monkeypatch.setattr(gemm_mod, "_TUNED", {})
    x, w = rand(70, 64, dtype=torch.bfloat16), rand(48, 64, dtype=torch.bfloat16, scale=64 ** -0.5)
    out = torch.empty(70, 48, device=DEV, dtype=torch.bfloat16)
    assert gemm_tma.eligible(x, w, out) == TMA_DEVICE
    monkeypatch.setattr(gemm_tma, "_ENABLED", False)
    assert not gemm_tma.eligible(x, w, out) and not gemm_tma.device_ok(x)
    assert rel_err(gemm(x, w, out=out), gemm_ref(x, w)) < TOL[torch.bfloat16]
    assert gemm_mod._TUNED and all(not c.kwargs.get("TMA") for c in gemm_mod._TUNED.values())
