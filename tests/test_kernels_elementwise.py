"""Tests for the elementwise Triton kernels (norms, SwiGLU, embedding, KV append) against their fp32 references
(RoPE: tests/test_kernels_rope.py)."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import BT, DEV, DTYPES, GQA_HEADS, INTERPRET, close, cuda_only, qkv_views, rand  # noqa: F401  (sets TRITON_INTERPRET first)

from kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref  # noqa: E402
from kernels.embedding import embedding, embedding_ref  # noqa: E402
from kernels.kv_append import kv_append_, kv_append_ref  # noqa: E402
from kernels.rmsnorm import rmsnorm, rmsnorm_ref  # noqa: E402
from kernels.swiglu import swiglu, swiglu_ref  # noqa: E402


# ----------------------------------------------------------------------------- rmsnorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 896])
@pytest.mark.parametrize("bt", BT)
def test_rmsnorm(dtype, hidden, bt):
    x = rand(*bt, hidden, dtype=dtype) * 3
    w = rand(hidden, dtype=dtype, seed=2)
    out = rmsnorm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    close(out, rmsnorm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_rmsnorm_per_head_strided_view(dtype, d):
    q, k, _ = qkv_views(3, 5, 4, 2, d, dtype)
    w = rand(d, dtype=dtype, seed=3)
    assert not q.is_contiguous()
    for x in (q, k, q.transpose(1, 2)):
        close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_multi_row_programs_with_tail(dtype):
    from kernels.rmsnorm import row_blocking
    x, r = rand(37, 128, dtype=dtype) * 3, rand(37, 128, dtype=dtype, seed=4)
    w = rand(128, dtype=dtype, seed=2)
    esize = x.element_size()
    if INTERPRET:  # 16 rows per program: 3 programs, the last one 5 rows
        assert row_blocking(37, 128, esize, x.device)[0] == 16
        assert row_blocking(37, 128, 2 * esize, x.device)[0] == 16
    close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), dtype)
    normed, new_res = add_rmsnorm(x, r, w, 1e-6)
    ref_normed, ref_res = add_rmsnorm_ref(x, r, w, 1e-6)
    close(new_res, ref_res, dtype)
    close(normed, ref_normed, dtype)


def test_rmsnorm_bad_inputs():
    x = rand(2, 3, 64)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, rand(32), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        rmsnorm(x.to(torch.int32), rand(64), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm(rand(4, 64).t(), rand(4), 1e-6)
    with pytest.raises(ValueError, match="leading dims"):
        rmsnorm(rand(4, 4, 4, 4, 64)[::2, ::2, ::2, ::2], rand(64), 1e-6)


# ----------------------------------------------------------------------------- add_rmsnorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 896])
@pytest.mark.parametrize("bt", BT)
def test_add_rmsnorm(dtype, hidden, bt):
    x, r = rand(*bt, hidden, dtype=dtype), rand(*bt, hidden, dtype=dtype, seed=4)
    w = rand(hidden, dtype=dtype, seed=2)
    normed, new_res = add_rmsnorm(x, r, w, 1e-5)
    assert normed.dtype == dtype and new_res.dtype == dtype and normed.shape == x.shape
    # same rounding as torch's add; the interpreter truncates fp32->bf16 (GPU rounds), so 1 ulp there
    ulp = 2**-7 if dtype == torch.bfloat16 and INTERPRET else 0.0
    torch.testing.assert_close(new_res.float(), (x + r).float(), rtol=ulp, atol=0)
    ref_normed, ref_res = add_rmsnorm_ref(x, r, w, 1e-5)
    close(new_res, ref_res, dtype)
    close(normed, ref_normed, dtype)


def test_add_rmsnorm_bad_inputs():
    x = rand(2, 64)
    with pytest.raises(ValueError, match="residual shape"):
        add_rmsnorm(x, rand(3, 64), rand(64), 1e-6)
    with pytest.raises(ValueError, match="residual dtype"):
        add_rmsnorm(x, x.half(), rand(64), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        add_rmsnorm(rand(64, 2).t(), rand(2, 64), rand(64), 1e-6)


# ----------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 96, 896])
@pytest.mark.parametrize("bt", BT)
def test_swiglu(dtype, inter, bt):
    gu = rand(*bt, 2 * inter, dtype=dtype) * 2
    out = swiglu(gu)
    assert out.shape == (*bt, inter) and out.dtype == dtype
    close(out, swiglu_ref(gu), dtype)


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        swiglu(rand(2, 7))
    with pytest.raises(ValueError, match="contiguous"):
        swiglu(rand(8, 2).t())


# ----------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 896])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_embedding(dtype, hidden, id_dtype):
    table = rand(100, hidden, dtype=dtype)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(0)).to(DEV, id_dtype)
    out = embedding(ids, table)
    assert out.shape == (3, 5, hidden) and out.dtype == dtype
    assert torch.equal(out.float(), embedding_ref(ids, table))
    # strided ids and a row-strided table view
    wide = rand(100, 2 * hidden, dtype=dtype)
    assert torch.equal(embedding(ids.t(), wide[:, :hidden]).float(), embedding_ref(ids.t(), wide[:, :hidden]))


def test_embedding_out_of_range_is_masked():
    table = rand(10, 64)
    out = embedding(torch.tensor([1, 10, -1, 3], device=DEV), table)
    assert torch.equal(out[[0, 3]], table[[1, 3]]) and not out[1:3].any()


def test_embedding_bad_inputs():
    with pytest.raises(ValueError, match="int32 or int64"):
        embedding(torch.zeros(3, device=DEV), rand(10, 64))
    with pytest.raises(ValueError, match="2-D"):
        embedding(torch.zeros(3, dtype=torch.long, device=DEV), rand(10))


# ----------------------------------------------------------------------------- kv_append


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", GQA_HEADS)
@pytest.mark.parametrize("bt", BT)
def test_kv_append(dtype, d, heads, bt):
    (b, t), (hq, hk) = bt, heads
    _, k, v = qkv_views(b, t, hq, hk, d, dtype)
    seq = 8
    k_cache, v_cache = rand(b, hk, seq, d, dtype=dtype, seed=6), rand(b, hk, seq, d, dtype=dtype, seed=7)
    start = torch.tensor([0, 6, 3][:b], dtype=torch.int32, device=DEV)  # row 1 runs past S=8
    ref_k, ref_v = kv_append_ref(k, v, k_cache, v_cache, start)
    kv_append_(k, v, k_cache, v_cache, start)
    assert torch.equal(k_cache.float(), ref_k) and torch.equal(v_cache.float(), ref_v)


def test_kv_append_strided_cache():
    _, k, v = qkv_views(2, 3, 2, 2, 64, torch.float32)
    big_k, big_v = rand(2, 2, 2, 16, 64), rand(2, 2, 2, 16, 64, seed=1)
    k_cache, v_cache = big_k[:, :, 1], big_v[:, :, 0]  # [B, Hk, S, D] views, strided heads
    start = torch.tensor([14, 2], dtype=torch.int32, device=DEV)
    ref_k, ref_v = kv_append_ref(k, v, k_cache, v_cache, start)
    kv_append_(k, v, k_cache, v_cache, start)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_kv_append_bad_inputs():
    _, k, v = qkv_views(1, 2, 2, 2, 64, torch.float32)
    cache = rand(1, 2, 8, 64)
    with pytest.raises(ValueError, match="start_pos"):
        kv_append_(k, v, cache, cache.clone(), torch.zeros(2, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="dtype"):
        kv_append_(k, v, cache.half(), cache.half(), torch.zeros(1, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="does not match"):
        kv_append_(k, v, rand(1, 3, 8, 64), rand(1, 3, 8, 64), torch.zeros(1, dtype=torch.int32, device=DEV))


# ----------------------------------------------------------------------------- real shapes (GPU)
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [3584, 5120, 8192])
def test_real_shapes_norms_swiglu_embedding(dtype, hidden):
    x, r = rand(4, 512, hidden, dtype=dtype), rand(4, 512, hidden, dtype=dtype, seed=1)
    w = rand(hidden, dtype=dtype, seed=2)
    close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), dtype)
    normed, res = add_rmsnorm(x, r, w, 1e-6)
    close(normed, add_rmsnorm_ref(x, r, w, 1e-6)[0], dtype)
    gu = rand(2, 256, 2 * 4 * hidden, dtype=dtype)
    close(swiglu(gu), swiglu_ref(gu), dtype)
    table = rand(152064, hidden, dtype=dtype)
    ids = torch.randint(0, 152064, (4, 512), device=DEV)
    assert torch.equal(embedding(ids, table).float(), embedding_ref(ids, table))
