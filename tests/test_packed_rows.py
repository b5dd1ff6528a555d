"""The plain-torch path's packed linear (engine.quant.rows): decoded a slice of rows at a time on the CPU, the
same result as the whole weight decoded; the canonical weight's decode against its definition (engine.quant.spec's
docstring) written out here element-wise; row slices of both packed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quant import rows as rows_mod
from engine.quant.ggml import GGMLWeight
from engine.quant.rows import packed_linear
from engine.quant.spec import QuantSpec, QuantWeight, dequantize, unpack_codes
from kernels.ggml_blocks import BLOCKS, dequant_ref


def quant_weight(n: int, k: int, bits: int, group: int, kind: str, seed: int = 0) -> QuantWeight:
    """A random canonical weight: ``kind`` zeros / sym / mins, with a random input permutation if ``perm``."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    q = torch.randint(-2**31, 2**31 - 1, (n, k * bits // 32), dtype=torch.int32, generator=g)
    scales = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001).to(torch.float16)
    zeros = torch.randint(0, 1 << bits, (n, k // gs), generator=g).to(torch.float16) if kind in ("zeros", "perm") \
        else None
    mins = (torch.randn(n, k // gs, generator=g) * 0.01).to(torch.float16) if kind == "mins" else None
    perm = torch.randperm(k, generator=g).to(torch.int32) if kind == "perm" else None
    return QuantWeight(q, scales, zeros, perm, QuantSpec(bits, group, zeros is None, "test", mins is not None), k,
                       mins)


def definition(w: QuantWeight) -> torch.Tensor:
    """The weight by the spec's formula, one group at a time, scattered to the input channels' order."""
    n, k = w.shape
    codes, g = unpack_codes(w.qweight, w.spec.bits).float(), w.group_size
    packed = torch.empty(n, k)
    for j in range(k // g):
        c, s = codes[:, j * g:(j + 1) * g], w.scales[:, j:j + 1].float()
        if w.mins is not None:
            packed[:, j * g:(j + 1) * g] = c * s + w.mins[:, j:j + 1].float()
        else:
            z = w.zeros[:, j:j + 1].float() if w.zeros is not None else float(1 << (w.spec.bits - 1))
            packed[:, j * g:(j + 1) * g] = (c - z) * s
    if w.perm is None:
        return packed
    out = torch.empty_like(packed)
    for j, c in enumerate(w.perm.tolist()):  # packed column j holds input channel perm[j]
        out[:, c] = packed[:, j]
    return out


@pytest.mark.parametrize("kind", ["zeros", "sym", "mins", "perm"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (4, -1), (8, -1)])
def test_dequantize_matches_the_definition(bits: int, group: int, kind: str) -> None:
    w = quant_weight(12, 256, bits, group, kind)
    assert torch.equal(dequantize(w), definition(w))


def ggml_weight(k: int) -> GGMLWeight:
    """Three parts of two types along N (7 + 5 + 6 rows), blocks of random codes with small finite scales."""
    parts = []
    for i, (qtype, n) in enumerate((("q4_1", 7), ("q8_0", 5), ("q4_1", 6))):
        values, size = BLOCKS[qtype]
        g = torch.Generator().manual_seed(i)
        b = torch.randint(0, 256, (n * k // values, size), dtype=torch.uint8, generator=g)
        for off in (0, 2) if qtype == "q4_1" else (0,):
            half = ((torch.rand(b.shape[0], 1, generator=g) - 0.5) * 0.05).to(torch.float16)
            b[:, off:off + 2] = half.view(torch.uint8)
        parts.append((qtype, b.view(n, -1)))
    return GGMLWeight(tuple(parts), k)


@pytest.mark.parametrize("start,stop", [(0, 18), (0, 7), (3, 9), (6, 13), (12, 18), (7, 12), (17, 18)])
def test_ggml_rows_span_parts(start: int, stop: int) -> None:
    w = ggml_weight(64)
    whole = torch.cat([dequant_ref(b, qtype, 64) for qtype, b in w.parts])
    assert torch.equal(w.dequantize(), whole)
    assert torch.equal(w.dequantize_rows(start, stop), whole[start:stop])


def test_row_slice_is_those_rows() -> None:
    w = quant_weight(10, 128, 4, 32, "perm")
    assert torch.equal(dequantize(w.row_slice(3, 8)), dequantize(w)[3:8])
    m = quant_weight(10, 128, 8, 64, "mins")
    assert torch.equal(dequantize(m.row_slice(0, 1)), dequantize(m)[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["awq-like", "gptq-perm", "ggml"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 100])
def test_sliced_linear_equals_the_whole(form: str, chunk_rows: int, dtype: torch.dtype, monkeypatch) -> None:
    """Slices of 1, 4 and 7 rows (across the GGUF weight's parts) and one slice for all, with a bias, [2, 3, K]."""
    k = 64
    w = ggml_weight(k) if form == "ggml" else quant_weight(18, k, 4, 32, "zeros" if form == "awq-like" else "perm")
    monkeypatch.setattr(rows_mod, "CHUNK_VALUES", chunk_rows * k)
    g = torch.Generator().manual_seed(chunk_rows)
    x = torch.randn(2, 3, k, generator=g).to(dtype)
    bias = torch.randn(18, generator=g).to(dtype)
    full = w.dequantize() if form == "ggml" else dequantize(w)
    got = packed_linear(x, w, bias)
    want = F.linear(x, full.to(dtype), bias)
    assert got.shape == (2, 3, 18) and got.dtype == dtype
    # fp32: a GEMM of other N may sum in another order (a few ulps); bf16: its rounding of each product sum
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(packed_linear(x[:, :1], w), torch.cat([F.linear(x[:, :1], full[r:r + chunk_rows].to(dtype))
                                                             for r in range(0, 18, chunk_rows)], dim=-1))
