"""bench/qgemv_sweep.py's candidate grid (CPU): every candidate is one the GEMV launcher accepts for
the Qwen2.5-7B shapes, labels are unique, and split-K appears only where the grid lacks programs."""

from __future__ import annotations

import pytest

from bench.qgemv_sweep import candidates, label
from kernels.quant_variants import variant_ok
from tools.bench_quant import QWEN7B_QUANT


@pytest.mark.parametrize("name,k,n", QWEN7B_QUANT)
def test_candidates_are_valid_and_distinct(name: str, k: int, n: int) -> None:
    cands = candidates(n, k, sms=132)
    labels = [label(c) for c in cands]
    assert len(labels) == len(set(labels)) > 90
    for c in cands:
        kw = c.kwargs
        assert variant_ok(kw["VARIANT"], 128, 4, kw["BLOCK_K"]) and kw["BLOCK_N"] * kw["BLOCK_K"] <= 65536
        if kw["SPLIT_K"] > 1:
            assert -(-n // kw["BLOCK_N"]) * kw["SPLIT_K"] // 2 < 4 * 132 and kw["TICKET"]
    assert {c.kwargs["VARIANT"] for c in cands} == {0, 1}
    if name == "gate_up":  # 37888 rows in tiles of 8: 4736 programs, no split
        assert all(c.kwargs["SPLIT_K"] == 1 for c in cands if c.kwargs["BLOCK_N"] == 8)
