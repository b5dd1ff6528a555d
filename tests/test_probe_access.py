"""bench/probe_access.py and bench/probe_ladder.py (CPU, interpreter): their read kernels visit every packed word
exactly once (the xor of a row's words, or of all of them, comes out), the ladder's scale level adds the scales'
products it loaded, and the tile grids hold only launches the kernels can take."""

from __future__ import annotations

import functools

import pytest
import torch

from bench.probe_access import _flat_kernel, _read_kernel, read_candidates
from bench.probe_ladder import SHAPES, TILES, _ladder_kernel, splits
from kernels.quant_x import quantize_x
from tools.bench_quant import packed_operands


def _xor(t: torch.Tensor) -> int:
    return functools.reduce(lambda a, b: a ^ b, t.flatten().tolist())


@pytest.mark.parametrize("tiled,bn,bw,split", [(False, 16, 16, 1), (False, 32, 8, 2), (True, 16, 16, 1),
                                               (True, 8, 32, 1)])
def test_read_kernel_visits_every_word(tiled: bool, bn: int, bw: int, split: int) -> None:
    n, kw = 64, 64
    w = torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32)
    out = torch.zeros(8 * n, dtype=torch.int32)
    _read_kernel[(n // bn, split)](w, out, n, kw, TILED=tiled, BLOCK_N=bn, BW=bw, SPLIT=split, STAGES=1)
    if tiled:  # the same words relaid: only the whole set's xor is defined
        assert _xor(out[:split * n]) == _xor(w)
    else:
        per = kw // split
        for s in range(split):
            assert out[s * n:(s + 1) * n].tolist() == [_xor(w[i, s * per:(s + 1) * per]) for i in range(n)]
    flat = torch.zeros(4, dtype=torch.int32)
    _flat_kernel[(4,)](w, flat, w.numel(), CHUNK=1024, BLOCK=256, STAGES=1)
    assert _xor(flat) == _xor(w)


def test_read_candidates_divide_the_shapes() -> None:
    for n, kw in ((37888, 448), (3584, 2368)):
        cands = read_candidates(n, kw)
        assert cands and all(n % c["BLOCK_N"] == 0 and kw % c["BW"] == 0 and kw // c["BW"] >= 2 * c["SPLIT"]
                             for c in cands)


@pytest.mark.parametrize("bn,bk,sk", [(32, 256, 1), (16, 128, 2)])
def test_ladder_levels(bn: int, bk: int, sk: int) -> None:
    n, k, group = 64, 512, 128
    _, q, s, z = packed_operands(1, k, n, 4, group, device="cpu")
    xq, d, qs = quantize_x(torch.randn(1, k))

    def run(level: int, words: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(8 * n)
        _ladder_kernel[(n // bn, sk)](xq, d, qs, words, s, z, out, n, k, q.stride(0), s.stride(0), LEVEL=level,
                                      BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_C=group, STAGES=1)
        return out[:sk * n].view(sk, n)

    per = k // 8 // sk
    words = torch.tensor([[_xor(q[i, p * per:(p + 1) * per]) for i in range(n)] for p in range(sk)],
                         dtype=torch.int32).float()
    assert torch.equal(run(0, q), words)
    # with zero words (the xor then 0): each 32-column block of a part adds its group's scale times zero point
    sz = (s.float() * z.float()).repeat_interleave(group // 32, dim=1).view(n, sk, -1).sum(2).T
    torch.testing.assert_close(run(1, torch.zeros_like(q)), sz, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(run(2, q)).all() and not torch.equal(run(2, q), run(1, q))


def test_ladder_grid_fits_the_shapes() -> None:
    for n, k in SHAPES.values():
        for bn, bk, _, _, _ in TILES:
            sks = splits(k, bk)
            assert sks[0] == 1 and all(k // bk >= 2 * sk for sk in sks) and k % bk == 0 and n % bn == 0
    assert splits(3584, 512) == [1, 2] and splits(18944, 128) == [1, 2, 4, 8]
