"""Tests for the fused RoPE + KV append (kernels/rope_kv_append.py), a decode step's one token a sequence and a
prompt slice's T, against the fp32 references and against the two kernels it replaces (kernels/rope.py,
kernels/kv_append.py)."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV, DTYPES, close, qkv_views, rand  # noqa: F401  (sets TRITON_INTERPRET first)

from kernels.kv_append import kv_append_  # noqa: E402
from kernels.rope import apply_rope_, rope_tables  # noqa: E402
from kernels.rope_kv_append import rope_kv_append_, rope_kv_append_ref  # noqa: E402


def _case(b: int, hq: int, hk: int, d: int, s: int, dtype: torch.dtype, starts: list[int], rows: list[int],
          t: int = 1):
    """Rows' first table rows ``rows`` (each token of a row the next one) and cache positions ``starts``."""
    q, k, v = qkv_views(b, t, hq, hk, d, dtype)
    q, k, v = (x.to(DEV) for x in (q, k, v))
    kc, vc = rand(b, hk, s, d, dtype=dtype, seed=3).to(DEV), rand(b, hk, s, d, dtype=dtype, seed=4).to(DEV)
    cos, sin = (x.to(DEV) for x in rope_tables(d, 48, 10000.0, None))
    pos = (torch.tensor(rows, dtype=torch.int64).view(b, 1) + torch.arange(t)).to(DEV)
    start = torch.tensor(starts, dtype=torch.int32, device=DEV)
    return q, k, v, cos, sin, pos, kc, vc, start


@pytest.mark.parametrize("t", [1, 5])  # a decode step; a prompt slice (row 1 runs past the table, row 2 past S)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hk,d", [(1, 28, 4, 128), (3, 4, 2, 64), (2, 7, 1, 32), (1, 6, 6, 16)])
def test_matches_the_reference_and_the_two_kernels(dtype, b, hq, hk, d, t):
    starts, rows = [5, 0, 13][:b], [5, 45, 11][:b]
    q, k, v, cos, sin, pos, kc, vc, start = _case(b, hq, hk, d, 16, dtype, starts, rows, t)
    k_before = k.clone()
    q_ref, kc_ref, vc_ref = rope_kv_append_ref(q, k, v, cos, sin, pos, kc, vc, start)
    q2, k2, kc2, vc2 = q.clone(), k.clone(), kc.clone(), vc.clone()  # the pair of launches it replaces
    apply_rope_(q2, k2, cos, sin, pos)
    kv_append_(k2, v, kc2, vc2, start)
    rope_kv_append_(q, k, v, cos, sin, pos, kc, vc, start)
    close(q, q_ref, dtype)
    close(kc, kc_ref, dtype)
    close(vc, vc_ref, dtype)
    assert torch.equal(k, k_before)  # only the cached copy is rotated
    if DEV == "cpu":  # the interpreter: the same fp32 operations, bit for bit
        assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    for got, want in ((q, q2), (kc, kc2), (vc, vc2)):  # a GPU may contract the products differently
        close(got, want.float(), dtype)


def test_out_of_range_positions_are_skipped_or_left_unrotated():
    """A cache position past S writes nothing (that row's caches unchanged); a table row past P leaves the
    token unrotated (q as it was, k cached as it was)."""
    q, k, v, cos, sin, pos, kc, vc, start = _case(2, 4, 2, 32, 8, torch.float32, starts=[8, 3], rows=[2, 60])
    q0, kc0, vc0 = q.clone(), kc.clone(), vc.clone()
    rope_kv_append_(q, k, v, cos, sin, pos, kc, vc, start)
    assert torch.equal(kc[0], kc0[0]) and torch.equal(vc[0], vc0[0])  # row 0: position 8 of 8, skipped
    assert not torch.equal(q[0], q0[0])  # ... but its q still rotated (table row 2)
    assert torch.equal(q[1], q0[1])  # row 1: table row 60 of 48, unrotated
    assert torch.equal(kc[1, :, 3], k[1, 0]) and torch.equal(vc[1, :, 3], v[1, 0])
    assert torch.equal(kc[1, :, :3], kc0[1, :, :3]) and torch.equal(kc[1, :, 4:], kc0[1, :, 4:])


def test_bad_inputs_raise_value_errors():
    q, k, v, cos, sin, pos, kc, vc, start = _case(1, 4, 2, 32, 8, torch.float32, starts=[0], rows=[0])
    with pytest.raises(ValueError, match="positions must be"):
        q2, k2, v2 = (x.expand(1, 2, *x.shape[2:]) for x in (q, k, v))
        rope_kv_append_(q2, k2, v2, cos, sin, pos, kc, vc, start)
    with pytest.raises(ValueError, match="kv_append_"):
        rope_kv_append_(q, k, v, cos, sin, pos, kc[:, :1], vc[:, :1], start)
    with pytest.raises(ValueError, match="apply_rope_"):
        rope_kv_append_(q, k, v, cos.double(), sin, pos, kc, vc, start)
