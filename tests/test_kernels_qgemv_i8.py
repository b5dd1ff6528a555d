"""kernels/qgemv_i8.py: the batch-1 int4 GEMV on int8-rounded x (dp4a on the GPU, emulated bytes in the
interpreter). Its arithmetic is checked against its own fp32 reference (x rounded as stage 1 rounds it) to
fp32 accuracy, its total error against fp32 torch on the unrounded x within the int8 rounding's bound, and
its sm_90 build for the dp4a loop it exists for (instructions per code, no spill)."""
from __future__ import annotations

import os
import re

import pytest
import torch

from kernels import qgemv as q
from kernels import qgemv_candidates
from kernels.qgemv_i8 import launch_i8, qgemv_i8_ref
from kernels.quant_x import decode_x, quantize_x, quantize_x_ref
from tests.test_kernels_ggml import NV_BIN
from tools.bench_quant import packed_operands

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INT8_ERR = 1.5e-2  # relative (Frobenius) error against fp32 torch on x itself: x's int8 rounding, bf16 output


def _operands(k: int, n: int, group: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    x, qw, s, z = packed_operands(1, k, n, 4, group, device=DEV)
    return x.to(dtype), qw, s, z


@pytest.mark.parametrize("k", [32, 96, 256, 1056])
def test_quantize_x_matches_its_reference(k: int) -> None:
    x = torch.randn(1, k, device=DEV) * torch.linspace(0.1, 10, k, device=DEV)
    if k >= 64:
        x[0, :32] = 0.0  # an all-zero block: step 0, codes 0
        x[0, 40] = -x[0, 32:64].abs().max() / 2  # x / step = -63.5 exactly: float error picks the side
    xq, d, qs = quantize_x(x)
    codes, step = quantize_x_ref(x)
    (got, got_step), codes, step, d, qs = decode_x(xq.cpu(), d.cpu()), codes[0], step[0], d[0], qs[0]
    got, got_step = got[0], got_step[0]
    assert torch.allclose(got_step, step.cpu(), rtol=1e-6, atol=0) and (k < 64 or d[0] == 0)
    assert torch.equal(qs.cpu(), got.view(-1, 32).sum(1).int())
    assert got.abs().max() <= 127
    # the words: xq[j] holds columns 8j, 8j+2, 8j+4, 8j+6 as bytes, xq[k/8 + j] columns 8j+1, ..., 8j+7 (decode_x);
    # a code may differ by one from the reference's where x / step is a half within float error
    y = (x.float() / torch.where(step > 0, step, 1)).cpu()
    near_half = ((y.abs() - y.abs().floor() - 0.5).abs() < 1e-4)[0]
    diff = (got - codes.cpu()).abs()
    assert diff.max() <= 1 and bool(near_half[diff > 0].all())


CASES = [  # K, N, group, BLOCK_N, BLOCK_K, SPLIT_K
    (256, 64, 128, 16, 128, 1),
    (512, 48, 64, 16, 128, 2),  # groups smaller than the K step: scales gathered per 32 columns
    (384, 40, 32, 32, 256, 2),  # K not a multiple of BLOCK_K: the masked tail
    (1024, 33, 128, 16, 64, 4),  # N not a multiple of BLOCK_N, ticketed split-K
    (3584, 24, 128, 16, 128, 8),  # the 7B's K
    (3584, 40, 128, 16, 512, 7),  # one K step a split (bench/probe_qkernels.py's balanced splits of the 7B's o)
]


@pytest.mark.parametrize("m,k,n,group,bn,bk,sk", [(m, *c) for c in CASES for m in ((1, 3) if c[0] <= 512 else (1,))])
@pytest.mark.parametrize("kind", ["zeros", "symmetric", "mins"])
def test_qgemv_i8_arithmetic(m: int, k: int, n: int, group: int, bn: int, bk: int, sk: int, kind: str) -> None:
    """fp32 x of m rows: the kernel equals its reference (x rounded as stage 1 rounds it) to fp32 accuracy."""
    x, qw, s, z = _operands(k, n, group, torch.float32)
    x = torch.cat([x, torch.randn(m - 1, k, device=DEV) * 3])
    zeros, mins = {"zeros": (z, None), "symmetric": (None, None), "mins": (None, s * -7.5)}[kind]
    bias = torch.randn(n, device=DEV)
    out = torch.empty(m, n, device=DEV)
    cfg = q.config(bn, bk, sk, warps=4, stages=2, ticket=sk > 1, variant=4)
    launch_i8(cfg, x, qw, s, zeros if mins is None else mins, group, bias, out, mins is not None, DEV == "cuda")
    xq, d, _ = quantize_x(x)  # the codes stage 1 gave (deterministic)
    ref = qgemv_i8_ref(x, qw, s, zeros, bias, mins, rounded=decode_x(xq, d))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("layout", ["rows3d", "words2d", "trans"])
@pytest.mark.parametrize("m,k,n,group,bn,bk,sk", [(1, *CASES[1]), (3, *CASES[2]), (1, *CASES[3])])
def test_every_code_layout_computes_the_same(monkeypatch, layout: str, m: int, k: int, n: int, group: int,
                                                  bn: int, bk: int, sk: int) -> None:
    """kernels/qgemv_i8.py's code layouts, TRANS (the default: the tile's axes [NBLK, BLOCK_N, 4]), the
    [BLOCK_N, NBLK, 4] tile it replaced, and WORDS2D (codes loaded 2-D, viewed 3-D): the same arithmetic
    (gathered scales, a masked K tail, ticketed split-K)."""
    from kernels import qgemv_i8

    x, qw, s, z = _operands(k, n, group, torch.float32)
    x = torch.cat([x, torch.randn(m - 1, k, device=DEV) * 3])
    cfg = q.config(bn, bk, sk, warps=4, stages=2, ticket=sk > 1, variant=4)
    out = torch.empty(m, n, device=DEV)
    monkeypatch.setattr(qgemv_i8, "WORDS2D", layout == "words2d")
    monkeypatch.setattr(qgemv_i8, "TRANS", layout == "trans")
    launch_i8(cfg, x, qw, s, z, group, None, out, False, DEV == "cuda")
    xq, d, _ = quantize_x(x)
    ref = qgemv_i8_ref(x, qw, s, z, None, None, rounded=decode_x(xq, d))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("k,n,group,bn,bk,sk", CASES[:3])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_qgemv_i8_through_qgemv_against_fp32(m: int, k: int, n: int, group: int, bn: int, bk: int, sk: int) -> None:
    """bf16 x through kernels.qgemv's dispatch (the tuner's variant 4): within INT8_ERR of fp32 torch on x."""
    x, qw, s, z = _operands(k, n, group, torch.bfloat16, seed=1)
    x = torch.cat([x, torch.randn(m - 1, k, device=DEV, dtype=x.dtype)])
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    perm = torch.randperm(k, device=DEV).to(torch.int32)
    out = q._qgemv(x, qw, s, z, 4, bias, perm, cfg=q.config(bn, bk, sk, warps=4, stages=2, ticket=sk > 1, variant=4))
    ref = q.qgemv_ref(x, qw, s, z, 4, bias, perm)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < INT8_ERR


def test_a_register_cap_is_a_launch_option(monkeypatch) -> None:
    """kernels.qgemv_candidates.config's maxnreg: a MAXNREG key (only when set), passed to the launch as Triton's maxnreg
    (the interpreter ignores it: the same numbers), among the tuner's candidates, and only for variant 4."""
    from kernels import qgemv_i8
    from kernels.tuning_cache import config_from_json, config_to_json

    capped, plain = q.config(16, 128, variant=4, maxnreg=64), q.config(16, 128, variant=4)
    assert capped.kwargs["MAXNREG"] == 64 and "MAXNREG" not in plain.kwargs
    assert config_to_json(config_from_json(config_to_json(capped))) == config_to_json(capped) != config_to_json(plain)
    with pytest.raises(AssertionError):
        q.config(16, 128, variant=1, maxnreg=64)
    x, qw, s, z = _operands(256, 48, 128, torch.float32)
    outs, seen = [], []
    real = qgemv_i8._qgemv_i8_kernel
    monkeypatch.setattr(qgemv_i8, "_qgemv_i8_kernel", type("K", (), {
        "__getitem__": lambda self, grid: lambda *a, **kw: (seen.append(kw.get("maxnreg")), real[grid](*a, **kw))})())
    for cfg in (plain, capped):
        outs.append(torch.empty(1, 48, device=DEV))
        launch_i8(cfg, x, qw, s, z, 128, None, outs[-1], False, DEV == "cuda")
    assert seen == [None, 64] and torch.equal(outs[0], outs[1])
    monkeypatch.setattr(qgemv_candidates, "_INTERPRET", False)
    for block_m, caps in ((1, {64, 48}), (2, {64, 96})):
        assert caps <= {c.kwargs.get("MAXNREG") for c in q._candidates(block_m, 37888, 3584, 132, int8_x=True)}


def test_variant_4_refuses_what_it_cannot_run() -> None:
    x, qw, s, z = _operands(256, 16, 128, torch.bfloat16)
    cfg = q.config(16, 128, variant=4)
    with pytest.raises(ValueError, match="variant 4 cannot run M=5"):
        q._qgemv(x.expand(5, -1).contiguous(), qw, s, z, 4, cfg=cfg)
    x8, qw8, s8, z8 = packed_operands(1, 256, 16, 8, 128, device=DEV)
    with pytest.raises(ValueError, match="variant 4 cannot run M=1 .*int8"):
        q._qgemv(x8, qw8, s8, z8, 8, cfg=cfg)


def test_tuner_candidates_include_variant_4_unless_turned_off(monkeypatch) -> None:
    monkeypatch.setattr(qgemv_candidates, "_INTERPRET", False)
    for block_m in (1, 16):  # 16: the tensor-core bucket, which rows 2-4 share with their own key
        variants = {c.kwargs["VARIANT"] for c in q._candidates(block_m, 4608, 3584, 132, int8_x=True)}
        assert 4 in variants and len(variants) >= 3
        assert all(c.kwargs["VARIANT"] != 4 for c in q._candidates(block_m, 4608, 3584, 132))  # fp32 x, M > 4
    assert all(c.kwargs["VARIANT"] != 4 for c in q._candidates(1, 4608, 3584, 132, bits=8, int8_x=True))
    monkeypatch.setenv("LAYERSTREAM_INT8_X", "0")
    assert all(c.kwargs["VARIANT"] != 4 for c in q._candidates(1, 4608, 3584, 132, int8_x=True))


_SM90 = """
from tests.test_kernels_qgemv_sm90 import compile_i8, loads_after_first_dot, loop_instructions
from kernels import qgemv as q
from kernels import qgemv_candidates
for rows, shapes in ((1, q._I8_SHAPES), (2, q._I8_ROWS_SHAPES), (4, q._I8_ROWS_SHAPES)):
    for bn, bk, warps, stages, *regs in shapes:
        usage, sass = compile_i8(rows, bn, bk, warps, stages, regs[0] if regs else None)
        print(f"M={rows} {bn}x{bk} w{warps} s{stages} cap {regs[0] if regs else 0}: {usage} | loop "
              f"{loop_instructions(sass)} idp {sass.count('IDP.4A')} codes {bn * bk // (32 * warps)} "
              f"late {loads_after_first_dot(sass)}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not (NV_BIN / "cuobjdump").exists(), reason="Triton's NVIDIA tools are not bundled")
def test_qgemv_i8_compiles_for_sm90_to_a_dp4a_loop() -> None:
    """Each variant-4 candidate compiles for sm_90 without spilling, with two DP4As per packed word of the
    thread's tile and row of x, its K loop within 110 instructions plus 1.5 per code for one row of x, 2.5 for
    two, 5.5 for four (Triton 3.6, the [NBLK, BLOCK_N, 4] tile: 56-199 for one row, 67-492 for two, 132-874 for
    four; the H200's fastest tiles hold few codes a thread, so a step's fixed addressing weighs more than in the
    fewest-instruction ones; 8 x 1024 at 96 registers takes 199 for 64 codes).
    The tiles with a register cap issue every load of a K step before its first dot product (the point of the cap:
    left alone, ptxas issues some of them after it, a second wait on memory each step)."""
    from tests.test_kernels_ggml import sm90_report
    lines = sm90_report(_SM90)
    assert len(lines) == len(q._I8_SHAPES) + 2 * len(q._I8_ROWS_SHAPES), lines
    for line in lines:
        assert "STACK:0" in line and "LOCAL:0" in line, line
        rows = int(line.split()[0].removeprefix("M="))
        loop, idp, codes = (int(v) for v in re.search(r"loop (\d+) idp (\d+) codes (\d+)", line).groups())
        assert idp >= rows * codes // 4, line  # 2 DP4As per packed word (8 codes) and row of x
        budget = 110 + {1: 1.5, 2: 2.5, 4: 5.5}[rows] * codes  # all rows (the split dots: 5.8-9.7 per code)
        assert loop <= budget, f"{loop} loop instructions for {codes} codes: {line}"
        if " cap 0:" not in line:
            assert re.search(r" late (\d+)$", line).group(1) == "0", line


def test_the_probes_balanced_splits_divide_k_and_fill_whole_waves() -> None:
    """bench/probe_qkernels.py's probe-only int8-x tiles for the 7B's o_proj on 132 SMs: each split-K divides K's
    steps and its programs fill >= 90% of whole waves; gate_up (already 93% of copy) gets none."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "probe_qkernels.py"
    spec = importlib.util.spec_from_file_location("probe_qkernels", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    o = probe.balanced_i8(3584, 3584, 132)
    tiles = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]) for c in o]
    assert (16, 512, 7) in tiles and probe.balanced_i8(37888, 3584, 132) == []
    for bn, bk, sk in tiles:
        programs = -(-3584 // bn) * sk
        assert (3584 // bk) % sk == 0 and programs / (-(-programs // 132) * 132) >= 0.9
