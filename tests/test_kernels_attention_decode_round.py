"""kernels/attention_decode.py with ``rounded=True``: o_proj's x rounded to int8 in the attention's epilogue.

Each of the three places that write the output (a single split, the program drawing a group's last ticket, the
second pass) also rounds the rows it writes (kernels.quant_x.round_tile); the codes, steps and code sums must be
exactly those kernels.quant_x.quantize_x gives on the output, so the int8-x GEMV reads the same x either way.
Under TRITON_INTERPRET=1 without CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels.attention_decode import attention_decode  # noqa: E402
from kernels.quant_x import quantize_x  # noqa: E402

from tests.kernel_utils import DEV, DTYPES, randn as rand  # noqa: E402

CASES = [  # B, Hq, Hk, D, S, seq_lens: GQA 1..7, an empty sequence, one key
    (1, 28, 4, 128, 48, [47]),
    (3, 4, 2, 64, 40, [40, 1, 0]),
    (2, 6, 2, 32, 30, [30, 17]),
]
PLANS = [(1, None), (3, False), (3, True), (5, True)]  # (splits, fused): direct; pass 2; last ticket


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hk{}D{}".format(*c[:4]))
def test_the_rounded_rows_are_quantize_x_of_the_output(case, dtype):
    B, Hq, Hk, D, S, seq_lens = case
    qkv = rand(B, (Hq + 2 * Hk) * D, dtype=dtype)
    q = qkv[:, : Hq * D].view(B, Hq, D)
    k, v = rand(B, Hk, S, D, dtype=dtype), rand(B, Hk, S, D, dtype=dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    for splits, fused in PLANS:
        plain = attention_decode(q, k, v, sl, D ** -0.5, num_splits=splits, fused=fused)
        out, (xq, d, qs) = attention_decode(q, k, v, sl, D ** -0.5, num_splits=splits, fused=fused, rounded=True)
        assert torch.equal(out, plain), (splits, fused)
        want = quantize_x(out.reshape(B, Hq * D))
        assert xq.shape == (B, Hq * D // 4) and d.shape == qs.shape == (B, Hq * D // 32)
        assert torch.equal(xq, want[0]) and torch.equal(d, want[1]) and torch.equal(qs, want[2]), (splits, fused)
        for b, n in enumerate(seq_lens):
            if n == 0:  # zeros: steps and codes zero
                assert not bool(xq[b].any()) and not bool(d[b].any()) and not bool(qs[b].any())


def test_a_head_dim_the_epilogue_cannot_round_is_refused():
    bf16 = torch.bfloat16
    q, k, v = rand(1, 4, 80, dtype=bf16), rand(1, 2, 8, 80, dtype=bf16), rand(1, 2, 8, 80, dtype=bf16)
    sl = torch.tensor([8], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="power of two >= 32, got 80"):
        attention_decode(q, k, v, sl, 0.1, rounded=True)
    q, k, v = rand(1, 4, 64, dtype=bf16), rand(1, 2, 8, 64, dtype=bf16), rand(1, 2, 8, 64, dtype=bf16)
    out, (xq, d, qs) = attention_decode(q[:0], k[:0], v[:0], sl[:0], 0.1, rounded=True)  # no rows: nothing runs
    assert out.shape == (0, 4, 64) and xq.shape == (0, 64) and d.shape == qs.shape == (0, 8)


def _compile_sm90(fn, sig: dict[str, str], meta: dict, warps: int, stages: int) -> str:
    """cuobjdump's resource line of Triton kernel ``fn`` built for sm_90 on the CPU (Triton's bundled ptxas)."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_kernels_ggml import NV_BIN

    names = fn.arg_names
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    meta = {a: v for a, v in {**defaults, "PDL_CHAIN": False, **meta}.items() if a in names}
    full = {a: "constexpr" if a in meta else sig.get(a, "i32") for a in names}
    src = ASTSource(fn, full, constexprs={(names.index(a),): v for a, v in meta.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in names if full[a].startswith("*")})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(NV_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    return next(line.strip() for line in usage.splitlines() if "REG:" in line)


def report_round() -> None:
    """Two lines per place that writes the output (run with TRITON_INTERPRET=0): ``path ROUND: <resource line>`` of
    the 7B's decode attention (28 heads over 4, head dim 128, bf16, the default tile) built for sm_90, without and
    with the rounding epilogue."""
    from kernels import attention_decode as ad

    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptrs.update({n: "*fp32" for n in ("ws_m_ptr", "ws_l_ptr", "ws_acc_ptr", "xd_ptr")})
    ptrs.update({n: "*i32" for n in ("seqlen_ptr", "cnt_ptr", "xq_ptr", "xs_ptr")}, qk_scale="fp32")
    for rnd in (False, True):
        for path in ("direct", "last ticket"):
            direct = path == "direct"
            meta = dict(BLOCK_H=16, BLOCK_N=64, BLOCK_D=128, IS_FP32=False, UPCAST=False, DIRECT=direct, PDL=False,
                        FUSED=not direct, BLOCK_G=1 if direct else 8, BLOCK_S=8, ROUND=rnd)
            print(f"{path} {rnd}: {_compile_sm90(ad._attention_decode_kernel, ptrs, meta, 4, 2)}")
        meta = dict(BLOCK_S=64, BLOCK_D=128, PDL=False, ROUND=rnd)
        print(f"pass 2 {rnd}: {_compile_sm90(ad._attention_decode_reduce_kernel, ptrs, meta, 8, 1)}")


def test_the_rounding_epilogue_compiles_for_sm90_and_spills_little_more() -> None:
    """The GPU build the interpreter never makes: the decode attention with ``ROUND`` at each place that writes its
    output, built for the H200's / H100's sm_90 by Triton's bundled ptxas. The kernel without it already takes
    254-255 registers in pass 1 at the default tile (Triton 3.9: 8 bytes of spill where one split writes); the
    epilogue may add at most 8 bytes of stack, and none in the merge that pass 2 does (bench: not timed yet)."""
    import re

    from tests.test_kernels_ggml import NV_BIN, sm90_report

    if not (NV_BIN / "cuobjdump").exists():
        pytest.skip("Triton's NVIDIA tools are not bundled")
    lines = sm90_report("from tests.test_kernels_attention_decode_round import report_round; report_round()")
    stack = {line.split(":")[0]: int(re.search(r"STACK:(\d+)", line).group(1)) for line in lines
             if "STACK:" in line}
    for path in ("direct", "last ticket", "pass 2"):
        assert stack[f"{path} True"] <= stack[f"{path} False"] + 8, lines
    assert stack["pass 2 True"] == 0, lines
