"""Tests for the flash-decoding attention kernel (kernels/attention_decode.py).

On a machine without CUDA the kernel runs under TRITON_INTERPRET=1 on small shapes; long
contexts, the tuner and CUDA-graph replays are CUDA-only. Every check compares with
``attention_decode_ref`` (fp32) by relative Frobenius error on fresh random inputs.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Fixed default launch configs keep the GPU run short; KERNELS_AUTOTUNE=1 tests tuned ones.
os.environ.setdefault("KERNELS_AUTOTUNE", "0")

from kernels.attention_decode import attention_decode, attention_decode_ref  # noqa: E402

from tests.kernel_utils import DEV, DTYPES, MATMUL_TOL as TOL, needs_cuda, randn as rand, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()


DECODE_CASES = [  # B, Hq, Hk, D, S, seq_lens  (GQA ratios 1..8, lengths 0 and 1, mixed batches)
    (1, 2, 2, 64, 40, [40]),
    (3, 4, 2, 128, 100, [100, 1, 57]),
    (3, 7, 1, 64, 90, [90, 33, 0]),
    (2, 8, 2, 80, 70, [70, 16]),
    (1, 28, 4, 128, 96, [95]),
    (2, 8, 1, 64, 130, [130, 77]),
    (1, 6, 2, 32, 50, [0]),
    (4, 3, 3, 16, 33, [1, 0, 33, 17]),
    (2, 12, 2, 48, 45, [45, 29]),
]
# (max_seq_len, num_splits, fused): bound = S, the true max, one below the lengths; forced 1
# split (pass 1 writes out), 3 splits, and 9 (more non-empty splits than a merge step takes);
# merged by pass 2 or in pass 1 by the program drawing a group's last ticket (fused)
DECODE_PLANS = [(None, None, None), ("max", None, None), (16, None, None), (None, 1, None),
                (None, 3, False), (None, 9, False), (None, 3, True), (None, 9, True), ("max", None, True)]


def _decode_inputs(B, Hq, Hk, D, S, seq_lens, dtype):
    qkv = rand(B, (Hq + 2 * Hk) * D, dtype=dtype)
    q = qkv[:, : Hq * D].view(B, Hq, D)  # strided view like a fused qkv output
    k = rand(B, Hk, S, D, dtype=dtype)
    v = rand(B, Hk, S, D, dtype=dtype)
    return q, k, v, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "B{}Hq{}Hk{}D{}S{}".format(*c[:5]))
def test_attention_decode(case: tuple, dtype: torch.dtype) -> None:
    B, Hq, Hk, D, S, seq_lens = case
    q, k, v, sl = _decode_inputs(*case, dtype)
    scale = D ** -0.5
    ref = attention_decode_ref(q, k, v, sl, scale)
    for max_len, splits, fused in DECODE_PLANS:
        max_len = max(seq_lens) if max_len == "max" else max_len
        out = attention_decode(q, k, v, sl, scale, max_seq_len=max_len, num_splits=splits, fused=fused)
        assert out.shape == (B, Hq, D) and out.dtype == dtype
        if max(seq_lens) > 0:
            assert rel_err(out, ref) < TOL[dtype], (max_len, splits, fused)
        for b, n in enumerate(seq_lens):
            if n == 0:
                assert bool((out[b] == 0).all())


def test_attention_decode_split_plan() -> None:
    from kernels.decode_splits import MAX_SPLITS as _MAX_SPLITS, MIN_CHUNK as _MIN_CHUNK
    from kernels.decode_splits import split_candidates as _split_candidates, split_plan as _split_plan
    assert _split_plan(132, 1, 4, 4096) == 66  # >= 2 programs per SM
    assert _split_plan(132, 1, 4, 3 * _MIN_CHUNK) == 3  # no split shorter than _MIN_CHUNK
    assert _split_plan(132, 1, 4, 0) == 1 and _split_plan(132, 64, 8, 32768) == 1
    assert _split_plan(132, 1, 1, 1 << 20) == _MAX_SPLITS
    assert _split_candidates(132, 1, 4, 4096) == [16, 33, 66, min(132, 4096 // _MIN_CHUNK)]
    assert _split_candidates(132, 64, 8, 32768) == [1, 2]


@pytest.mark.parametrize("fastest", [(4, False), (9, True)])
def test_attention_decode_tune_picks_fastest(fastest: tuple) -> None:
    """The first-call tuning times (split count, config, merge) and keeps the fastest."""
    from kernels.attention_decode import _launch, _tune
    q, k, v, sl = _decode_inputs(2, 8, 2, 64, 70, [70, 16], torch.float16)
    timed = []

    def timer(fn):  # fake times by (split count, merge in one kernel): the candidate is the lambda's default
        fn()
        (splits, cfg), = fn.__defaults__
        timed.append((splits, bool(cfg.kwargs.get("FUSED"))))
        return 1.0 if timed[-1] == fastest else 2.0 + splits

    splits, cfg = _tune(q, k, v, 0.125, 70, [1, 4, 9], timer=timer)
    assert set(timed) == {(1, False), (4, False), (4, True), (9, False), (9, True)}
    assert (splits, bool(cfg.kwargs.get("FUSED"))) == fastest
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    _launch(q, k, v, sl, 0.125, splits, cfg, out)
    assert rel_err(out, attention_decode_ref(q, k, v, sl, 0.125)) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode_one_kernel_merge(dtype: torch.dtype) -> None:
    """The one-kernel path (the program drawing a group's last ticket merges it) into a NaN-filled
    out: empty sequences give zeros, partly empty split sets merge their non-empty splits only,
    and every launch leaves the counters at zero, so the next launch (reusing them) is right."""
    from kernels.attention_decode import _default_config, _launch, _with_fused
    from kernels.tickets import _COUNTERS
    cfg = _with_fused(_default_config(dtype))
    for case in [(3, 8, 2, 64, 100, [100, 0, 37]), (4, 10, 2, 32, 40, [1, 17, 0, 40])]:
        B, Hq, Hk, D, S, seq_lens = case
        q, k, v, sl = _decode_inputs(*case, dtype)
        ref = attention_decode_ref(q, k, v, sl, D ** -0.5)
        for splits in (3, 9, 9):  # the repeated 9 reuses the counters the first one left
            out = torch.full((B, Hq, D), float("nan"), device=DEV, dtype=dtype)
            _launch(q, k, v, sl, D ** -0.5, splits, cfg, out)
            assert rel_err(out, ref) < TOL[dtype], (case, splits)
            assert all(bool((out[b] == 0).all()) for b, n in enumerate(seq_lens) if n == 0)
            assert not bool(_COUNTERS[(q.device, "attention_decode")].any())


def test_attention_decode_bad_inputs() -> None:
    q = rand(2, 4, 64, dtype=torch.bfloat16)
    k = rand(2, 2, 16, 64, dtype=torch.bfloat16)
    sl = torch.tensor([3, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="seq_lens must be"):
        attention_decode(q, k, k, sl.long(), 0.1)
    with pytest.raises(ValueError, match="v_cache must be"):
        attention_decode(q, k, k[:1], sl, 0.1)
    with pytest.raises(ValueError, match="dtype mismatch"):
        attention_decode(q.half(), k, k, sl, 0.1)
    with pytest.raises(ValueError, match="multiple of Hk"):
        attention_decode(q[:, :3], k, k, sl, 0.1)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, D\]"):
        attention_decode(q[None], k, k, sl, 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        attention_decode(q, k, k, sl, 0.1, num_splits=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,seq_lens", [(4096, [4096, 3000]), (32768, [32768, 17]), (32768, [20000, 32000])])
def test_attention_decode_long(S: int, seq_lens: list[int], dtype: torch.dtype) -> None:
    B, Hq, Hk, D = len(seq_lens), 28, 4, 128
    q = rand(B, Hq, D, dtype=dtype)
    k = rand(B, Hk, S, D, dtype=dtype)
    v = rand(B, Hk, S, D, dtype=dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ref = attention_decode_ref(q, k, v, sl, D ** -0.5)
    for max_len in (None, max(seq_lens)):
        assert rel_err(attention_decode(q, k, v, sl, D ** -0.5, max_seq_len=max_len), ref) < TOL[dtype]


@needs_cuda
def test_attention_decode_tuned_and_graph_replay() -> None:
    """The real first-call tuning (CUDA-graph timing, PDL on sm90+), and a graph captured at the
    bound replayed at other lengths (the device spreads each over all splits)."""
    from kernels.attention_decode import _launch, _tune
    from kernels.decode_splits import split_candidates as _split_candidates
    S, sc = 4096, 128 ** -0.5
    q, k, v, sl = _decode_inputs(2, 28, 4, 128, S, [S, 1000], torch.bfloat16)
    plan = _tune(q, k, v, sc, S, _split_candidates(torch.cuda.get_device_properties(0).multi_processor_count, 2, 4, S))
    assert plan is not None
    out = torch.empty(2, 28, 128, device=DEV, dtype=torch.bfloat16)
    _launch(q, k, v, sl, sc, *plan, out)
    assert rel_err(out, attention_decode_ref(q, k, v, sl, sc)) < TOL[torch.bfloat16]
    attention_decode(q, k, v, sl, sc, max_seq_len=S)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = attention_decode(q, k, v, sl, sc, max_seq_len=S)
    for lens in ([1, 0], [300, 4095], [S, 2]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        assert rel_err(static, attention_decode_ref(q, k, v, sl, sc)) < TOL[torch.bfloat16], lens


@needs_cuda
def test_attention_decode_one_kernel_graph_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph captured with the one-kernel merge, replayed several times at other lengths (every
    replay starts from the counters the previous one reset); a capture that would have to
    allocate the counters falls back to pass 2 instead."""
    import kernels.tickets as mod
    S, sc = 4096, 128 ** -0.5
    q, k, v, sl = _decode_inputs(2, 28, 4, 128, S, [S, 1000], torch.bfloat16)
    for fresh in (False, True):
        run = lambda f=True: attention_decode(q, k, v, sl, sc, max_seq_len=S, num_splits=16, fused=f)  # noqa: E731
        run(), run(False)  # compile both paths and allocate the counters outside the capture
        if fresh:
            monkeypatch.setattr(mod, "_COUNTERS", {})
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = run()
        for lens in ([1, 0], [300, 4095], [0, 0], [S, 2], [17, S]) * 2:
            sl.copy_(torch.tensor(lens, dtype=torch.int32))
            graph.replay()
            assert rel_err(static, attention_decode_ref(q, k, v, sl, sc)) < TOL[torch.bfloat16], (fresh, lens)
            assert all(bool((static[b] == 0).all()) for b, n in enumerate(lens) if n == 0)
        torch.cuda.synchronize()
        key = (q.device, "attention_decode")
        assert (key not in mod._COUNTERS) if fresh else not bool(mod._COUNTERS[key].any())
