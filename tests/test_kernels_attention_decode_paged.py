"""Tests for the block-table decode attention kernel (kernels/attention_decode_paged.py).

Without CUDA the kernel runs under TRITON_INTERPRET=1 on small shapes. Each case compares with
``attention_decode_paged_ref`` and with the contiguous kernel's reference on the gathered cache.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.attention_decode import attention_decode_ref  # noqa: E402
from kernels.attention_decode_paged import attention_decode_paged, attention_decode_paged_ref  # noqa: E402
from tests.kernel_utils import DEV, DTYPES, MATMUL_TOL as TOL, randn as rand, rel_err  # noqa: E402

CASES = [  # B, Hq, Hk, D, BS, seq_lens (lengths 0, 1, a block, a block + 1; GQA 1..4)
    (1, 2, 2, 64, 16, [40]),
    (3, 4, 2, 32, 16, [33, 1, 16]),
    (2, 8, 2, 16, 32, [0, 70]),
    (4, 4, 1, 48, 16, [17, 5, 64, 2]),
]


def _inputs(B, Hq, Hk, D, BS, seq_lens, dtype, seed=0):
    torch.manual_seed(seed)
    m = max(1, max(-(-n // BS) for n in seq_lens))
    n_blocks = B * m + 3
    q = rand(B, Hq, D, dtype=dtype)
    k = rand(n_blocks, Hk, BS, D, dtype=dtype)
    v = rand(n_blocks, Hk, BS, D, dtype=dtype)
    perm = torch.randperm(n_blocks)[: B * m].view(B, m)  # scattered blocks...
    perm[-1, 0] = perm[0, 0]  # ...one of them shared by two sequences (a cached prefix)
    tables = perm.to(torch.int32).to(DEV)
    return q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def _gathered(k_blocks, tables):
    """The same keys as a contiguous [B, Hk, M * BS, D] cache."""
    g = k_blocks[tables.long()]  # [B, M, Hk, BS, D]
    B, M, Hk, BS, D = g.shape
    return g.permute(0, 2, 1, 3, 4).reshape(B, Hk, M * BS, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hk{}D{}BS{}".format(*c[:5]))
def test_matches_references(case, dtype):
    q, k, v, tables, sl = _inputs(*case, dtype)
    scale = case[3] ** -0.5
    ref = attention_decode_paged_ref(q, k, v, tables, sl, scale)
    contiguous = attention_decode_ref(q, _gathered(k, tables), _gathered(v, tables), sl, scale)
    assert rel_err(ref, contiguous) < 1e-6
    for splits in (None, 1, 3):
        out = attention_decode_paged(q, k, v, tables, sl, scale, num_splits=splits)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, ref) < TOL[dtype], f"splits={splits}"
    for b, n in enumerate(case[5]):
        if n == 0:
            assert out[b].abs().max() == 0


@pytest.mark.parametrize("bad,match", [
    (dict(bs=8), "power of two >= 16"),
    (dict(table_dtype=torch.int64), "block_tables must be"),
    (dict(hk=3), "multiple of Hk"),
])
def test_bad_inputs(bad, match):
    bs, hk = bad.get("bs", 16), bad.get("hk", 2)
    q = rand(2, 4, 16, dtype=torch.float32)
    k = rand(5, hk, bs, 16, dtype=torch.float32)
    tables = torch.zeros((2, 2), dtype=bad.get("table_dtype", torch.int32), device=DEV)
    with pytest.raises(ValueError, match=match):
        attention_decode_paged(q, k, k.clone(), tables, torch.ones(2, dtype=torch.int32, device=DEV), 1.0)
