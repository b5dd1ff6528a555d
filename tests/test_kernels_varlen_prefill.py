"""The stacked prompt slices of a pass in one launch each: ``rope_kv_append_`` with ``cache_rows`` and
``attention_prefill_varlen`` (sequences' rows one after another in a flat q, each with its own cache row)
against the same kernels launched a sequence at a time, and against the fp32 reference."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV, DTYPES, close, rand  # noqa: F401  (sets TRITON_INTERPRET first)

from kernels.attention_prefill import (attention_prefill, attention_prefill_ref,  # noqa: E402
                                       attention_prefill_varlen, varlen_block_m)
from kernels.rope import rope_tables  # noqa: E402
from kernels.rope_kv_append import rope_kv_append_  # noqa: E402


def _stack(spans: list[int], hq: int, hk: int, d: int, dtype: torch.dtype, seed: int = 0):
    """A flat qkv of sum(spans) rows ([R, (hq + 2 hk) d]) and its q / k / v views [1, R, heads, d]."""
    r = sum(spans)
    qkv = rand(r, (hq + 2 * hk) * d, dtype=dtype, seed=seed).to(DEV)
    q = qkv[:, : hq * d].view(1, r, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(1, r, hk, d)
    v = qkv[:, (hq + hk) * d:].view(1, r, hk, d)
    return qkv, q, k, v


CASES = [  # spans (rows a sequence), cache rows, start positions, real rows (q_lens), heads, head dim
    ([5, 3, 7], [2, 0, 3], [0, 4, 9], [5, 3, 7], 4, 2, 32),
    ([1, 9, 2, 6], [1, 3, 0, 2], [6, 0, 2, 11], [1, 9, 1, 4], 6, 6, 16),  # right padding in two spans
    ([33, 4], [1, 0], [0, 30], [33, 4], 7, 1, 64),  # a span over one key block, a late start
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spans,crows,starts,qlens,hq,hk,d", CASES)
def test_one_launch_equals_a_launch_a_sequence(spans, crows, starts, qlens, hq, hk, d, dtype):
    s, rows = 48, sum(spans)
    cos, sin = (x.to(DEV) for x in rope_tables(d, 64, 10000.0, None))
    kc = rand(4, hk, s, d, dtype=dtype, seed=3).to(DEV)
    vc = rand(4, hk, s, d, dtype=dtype, seed=4).to(DEV)
    qkv, q, k, v = _stack(spans, hq, hk, d, dtype)
    qkv2, kc2, vc2 = qkv.clone(), kc.clone(), vc.clone()
    r0 = [sum(spans[:i]) for i in range(len(spans))]
    # each token's table row and cache position, its cache row
    pos = torch.cat([torch.arange(st, st + n) for st, n in zip(starts, spans)]).to(DEV)
    row_of = torch.cat([torch.full((n,), c, dtype=torch.int32) for c, n in zip(crows, spans)]).to(DEV)
    rope_kv_append_(q, k, v, cos, sin, pos.view(1, rows), kc, vc, pos.to(torch.int32), cache_rows=row_of)
    seq_rows = torch.tensor([r0, spans], dtype=torch.int32, device=DEV)
    start_t = torch.tensor(starts, dtype=torch.int32, device=DEV)
    qlen_t = torch.tensor(qlens, dtype=torch.int32, device=DEV)
    crow_t = torch.tensor(crows, dtype=torch.int32, device=DEV)
    out = attention_prefill_varlen(q[0], kc, vc, start_t, qlen_t, seq_rows, crow_t, max(spans), 0.125)

    q2 = qkv2[:, : hq * d].view(1, rows, hq, d)  # the same values before the launch, a launch a sequence
    k2 = qkv2[:, hq * d: (hq + hk) * d].view(1, rows, hk, d)
    v2 = qkv2[:, (hq + hk) * d:].view(1, rows, hk, d)
    for i, n in enumerate(spans):
        sl = slice(r0[i], r0[i] + n)
        c = slice(crows[i], crows[i] + 1)
        rope_kv_append_(q2[:, sl], k2[:, sl], v2[:, sl], cos, sin, pos[sl].view(1, n), kc2[c], vc2[c],
                        start_t[i:i + 1])
    assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    for i, n in enumerate(spans):
        sl, c = slice(r0[i], r0[i] + n), slice(crows[i], crows[i] + 1)
        # alone at the one launch's row count (its rows past the span padding): the same row bucket, so the same
        # tuned tile and summation order (an H100 picked another tile for 4 rows than for 33: ULP apart, s45 call1)
        padded = torch.zeros(1, max(spans), hq, d, dtype=dtype, device=DEV)
        padded[:, :n] = q2[:, sl]
        alone = attention_prefill(padded, kc2[c], vc2[c], start_t[i:i + 1], qlen_t[i:i + 1], 0.125)
        assert torch.equal(out[sl], alone[0, :n]), f"sequence {i}"
        ref = attention_prefill_ref(q2[:, sl], kc2[c], vc2[c], start_t[i:i + 1], qlen_t[i:i + 1], 0.125)
        close(out[sl], ref[0], dtype)
        assert not out[sl][qlens[i]:].any(), "rows past q_lens are zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spans,crows,starts,qlens,hq,hk,d", CASES)
def test_a_block_table_gives_the_launch_a_sequence_and_block_gives(spans, crows, starts, qlens, hq, hk, d, dtype):
    """The same sequences padded as a captured layout pads them (two zero-length sequences, rows past the spans,
    ``max_rows`` the padded rows) through a block table with unused entries: the rows of the plain launch, bitwise
    (the same config, the same summation order)."""
    s, rows, pad = 48, sum(spans), 5
    kc = rand(4, hk, s, d, dtype=dtype, seed=3).to(DEV)
    vc = rand(4, hk, s, d, dtype=dtype, seed=4).to(DEV)
    _, q, _, _ = _stack(spans + [pad], hq, hk, d, dtype, seed=7)
    r0 = [sum(spans[:i]) for i in range(len(spans))]
    i32 = dict(dtype=torch.int32, device=DEV)
    args = (kc, vc, torch.tensor(starts, **i32), torch.tensor(qlens, **i32), torch.tensor([r0, spans], **i32),
            torch.tensor(crows, **i32))
    plain = attention_prefill_varlen(q[0, :rows], *args, max(spans), 0.125)
    n, padded = len(spans) + 2, rows + pad  # two empty sequences, `pad` rows of nobody's
    grow = lambda t, v: torch.cat([t, torch.full((2,), v, **i32)])  # noqa: E731
    seq_rows = torch.stack([grow(args[4][0], 0), grow(args[4][1], 0)]).contiguous()
    bm = varlen_block_m(padded, d, hq // hk, dtype)
    blocks = [i * 65536 + m for i, m_count in enumerate(spans) for m in range(-(-m_count // bm))][::-1]
    table = torch.tensor(blocks + [-1] * 3, **i32)
    out = torch.full((padded, hq, d), 7.0, dtype=dtype, device=DEV)
    got = attention_prefill_varlen(q[0], kc, vc, grow(args[2], 0), grow(args[3], 0), seq_rows, grow(args[5], 0),
                                   padded, 0.125, blocks=table, block_m=bm)
    out[:rows] = got[:rows]
    assert torch.equal(out[:rows], plain) or bm != varlen_block_m(max(spans), d, hq // hk, dtype)
    close(out[:rows], plain, dtype)
    with pytest.raises(ValueError, match="block_m"):
        attention_prefill_varlen(q[0], kc, vc, grow(args[2], 0), grow(args[3], 0), seq_rows, grow(args[5], 0),
                                 padded, 0.125, blocks=table, block_m=bm + 1)


def test_rows_outside_every_span_are_not_written():
    qkv, q, k, v = _stack([4, 4], 2, 2, 16, torch.float32)
    kc = rand(2, 2, 16, 16, dtype=torch.float32, seed=3).to(DEV)
    seq_rows = torch.tensor([[0, 5], [3, 3]], dtype=torch.int32, device=DEV)  # row 3 belongs to nobody
    out = attention_prefill_varlen(q[0], kc, kc.clone(), torch.zeros(2, dtype=torch.int32, device=DEV),
                                   torch.full((2,), 3, dtype=torch.int32, device=DEV), seq_rows,
                                   torch.tensor([0, 1], dtype=torch.int32, device=DEV), 3, 0.25)
    out2 = attention_prefill_varlen(q[0], kc, kc.clone(), torch.zeros(2, dtype=torch.int32, device=DEV),
                                    torch.full((2,), 3, dtype=torch.int32, device=DEV), seq_rows,
                                    torch.tensor([1, 0], dtype=torch.int32, device=DEV), 3, 0.25)
    assert torch.isfinite(out[:3]).all() and not torch.equal(out[:3], out2[:3])  # the cache row is read
    assert torch.equal(out[5:8], attention_prefill(q[:, 5:8], kc[1:2], kc[1:2].clone(),
                                                   torch.zeros(1, dtype=torch.int32, device=DEV),
                                                   torch.full((1,), 3, dtype=torch.int32, device=DEV), 0.25)[0])


@pytest.mark.parametrize("bad", ["seq_rows_shape", "seq_rows_dtype", "cache_rows_len", "q_dims"])
def test_bad_operands_are_value_errors(bad):
    _, q, k, v = _stack([4, 4], 2, 2, 16, torch.float32)
    kc = rand(2, 2, 16, 16, dtype=torch.float32, seed=3).to(DEV)
    z = torch.zeros(2, dtype=torch.int32, device=DEV)
    seq_rows = torch.tensor([[0, 4], [4, 4]], dtype=torch.int32, device=DEV)
    args = dict(q=q[0], k_cache=kc, v_cache=kc, start_pos=z, q_lens=z + 4, seq_rows=seq_rows, cache_rows=z,
                max_rows=4, scale=0.25)
    if bad == "seq_rows_shape":
        args["seq_rows"] = seq_rows[:, :1].contiguous()
    elif bad == "seq_rows_dtype":
        args["seq_rows"] = seq_rows.long()
    elif bad == "cache_rows_len":
        args["cache_rows"] = z[:1]
    else:
        args["q"] = q
    with pytest.raises(ValueError):
        attention_prefill_varlen(**args)
    with pytest.raises(ValueError, match="cache_rows"):  # the RoPE + append's per-token rows
        rope_kv_append_(q, k, v, *(x.to(DEV) for x in rope_tables(16, 16, 10000.0, None)),
                        torch.arange(8).view(1, 8).to(DEV), kc, kc,
                        torch.arange(8, dtype=torch.int32, device=DEV), cache_rows=z)


def test_a_negative_cache_position_writes_nothing():
    """Right padding laid out by engine/varlen.py: its token rotates q but leaves the caches as they were."""
    _, q, k, v = _stack([3], 2, 2, 16, torch.float32)
    kc = rand(2, 2, 8, 16, dtype=torch.float32, seed=3).to(DEV)
    vc, kc0 = kc.clone(), kc.clone()
    cos, sin = (x.to(DEV) for x in rope_tables(16, 16, 10000.0, None))
    rows = torch.tensor([1, 1, 1], dtype=torch.int32, device=DEV)
    at = torch.tensor([4, -1, 5], dtype=torch.int32, device=DEV)
    rope_kv_append_(q, k, v, cos, sin, torch.tensor([[4, 5, 5]], device=DEV), kc, vc, at, cache_rows=rows)
    changed = (kc != kc0).any(dim=(1, 3))  # [cache row, position]
    assert changed.nonzero().tolist() == [[1, 4], [1, 5]]
