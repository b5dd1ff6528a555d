"""engine/mlp_chunks.py: a long stack's MLP in pieces of its intermediate columns gives the whole MLP's output
(both backends; the Triton kernels under the interpreter): the pieces' planning, the loop on dense and packed
weights against an fp32 reference, and the tiny models' logits with and without pieces."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV  # (sets TRITON_INTERPRET first)

from engine import mlp_chunks  # noqa: E402
from engine.mlp_chunks import pieces, plan_pieces  # noqa: E402
from engine.ops import make_ops  # noqa: E402
from engine.quant.spec import QuantSpec, QuantWeight  # noqa: E402
from tests.helpers import make_engine, random_prompts  # noqa: E402
from tests.test_kernels_quant import packed  # noqa: E402


@pytest.mark.parametrize("inter,cols,align,want", [
    (18944, 4736, 128, [(0, 4736), (4736, 9472), (9472, 14208), (14208, 18944)]),  # the 7B in 4
    (18944, 6400, 128, [(0, 6400), (6400, 12800), (12800, 18944)]),  # 3 pieces, widths rounded up to 128
    (160, 100, 128, [(0, 128), (128, 160)]),  # the tiny model: an aligned piece and the rest
    (160, 10, 128, [(0, 128), (128, 160)]),  # never narrower than the alignment
])
def test_pieces_cover_the_columns_in_order(inter, cols, align, want):
    got = pieces(inter, cols, align)
    assert got == want
    assert all(j0 % align == 0 for j0, _ in got) and got[-1][1] == inter


class _Ops:
    name = "torch"
    _scratch = 0

    def __init__(self, budget):
        self.mlp_budget = budget


def test_plan_pieces_from_the_budget(monkeypatch):
    monkeypatch.delenv("LAYERSTREAM_MLP_PIECES", raising=False)
    w_gu, w_d = torch.empty(2 * 18944, 3584), torch.empty(3584, 18944)
    per_row = 3 * 3584 * 2 + 4 * 3584  # what a row holds besides its pieces (ROW_HIDDEN, the fp32 sum)
    budget = (2048, 6647 * (per_row + 3 * 3200 * 2))  # room for 6 pieces at 6,647 rows
    assert plan_pieces(_Ops(None), 6647, w_gu, w_d, 3584, 18944, 2) is None  # no budget: whole
    assert plan_pieces(_Ops(budget), 2048, w_gu, w_d, 3584, 18944, 2) is None  # a chunk's rows: whole
    assert len(plan_pieces(_Ops(budget), 6647, w_gu, w_d, 3584, 18944, 2)) == mlp_chunks.MOST_PIECES == 6
    assert len(plan_pieces(_Ops(budget), 4000, w_gu, w_d, 3584, 18944, 2)) == 6  # fewer rows: the same 6 (shapes)
    assert len(plan_pieces(_Ops(budget), 8000, w_gu, w_d, 3584, 18944, 2)) > 6  # more: narrower, within the bytes
    assert mlp_chunks.unit_rows(budget, 3584, 18944, 2) == 6592  # 6,647 rows at most, a multiple of 64
    monkeypatch.setenv("LAYERSTREAM_MLP_PIECES", "6")
    assert len(plan_pieces(_Ops(budget), 6647, w_gu, w_d, 3584, 18944, 2)) == 6
    spec = QuantSpec(bits=4, group_size=128, sym=False, fmt="awq")
    q, s, z = packed(64, 256, 128, 4, sym=False)
    act_order = QuantWeight(q, s, z, torch.arange(256, dtype=torch.int32), spec, 256)
    assert plan_pieces(_Ops(budget), 6647, act_order, act_order, 3584, 18944, 2) is None  # K in permuted order


def _quant(n: int, k: int, g: int, seed: int) -> QuantWeight:
    q, s, z = packed(n, k, g, 4, sym=False, seed=seed)
    return QuantWeight(q, s, z, None, QuantSpec(bits=4, group_size=g, sym=False, fmt="awq"), k)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("form", ["dense", "awq"])
def test_pieces_give_the_whole_mlp(kernels, form):
    """Rows x [R, H] through gate_up / SwiGLU / down in 3 pieces (the last narrower), against the fp32 MLP."""
    hidden, inter, rows = 64, 320, 300  # 300 rows: the Triton backend's dense (dequantize + GEMM) path
    ops = make_ops(kernels)
    dtype = torch.float32 if kernels == "torch" else torch.bfloat16
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(rows, hidden, generator=gen) * 0.5).to(dtype).to(DEV)
    if form == "dense":
        w_gu = (torch.randn(2 * inter, hidden, generator=gen) * hidden ** -0.5).to(dtype).to(DEV)
        w_d = (torch.randn(hidden, inter, generator=gen) * inter ** -0.5).to(dtype).to(DEV)
        dense_gu, dense_d = w_gu, w_d
    else:
        w_gu, w_d = _quant(2 * inter, hidden, 32, 1), _quant(hidden, inter, 64, 2)
        from engine.quant.spec import dequantize
        dense_gu, dense_d = dequantize(w_gu), dequantize(w_d)
        if kernels == "triton":
            ops.use_scratch(1 << 16)
    parts = [(0, 128), (128, 256), (256, 320)]
    out = mlp_chunks.run(ops, x, w_gu, w_d, parts, inter)
    assert out.shape == (rows, hidden) and out.dtype == dtype
    ref = mlp_chunks.reference(x, dense_gu, dense_d)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-qwen2-awq"])
def model_dir(request, tmp_path_factory):
    from engine.synth.writer import synthesize
    preset, _, _ = request.param.partition("-awq")
    return synthesize(preset, tmp_path_factory.mktemp("mlp") / request.param, dtype="bf16", seed=3,
                      quant="awq" if request.param.endswith("-awq") else None)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_long_prompt_in_pieces_keeps_its_logits(model_dir, kernels, monkeypatch):
    """A 40-token prompt's layers with stacks of more than 16 rows in pieces (160 intermediate columns: 128 and
    32) give the logits of the whole MLP; the pieces ran in every layer."""
    monkeypatch.delenv("LAYERSTREAM_MLP_PIECES", raising=False)
    eng = make_engine(model_dir, kernels=kernels, device=DEV, batch=1, max_context=64)
    try:
        ids = torch.tensor(random_prompts([40], eng.cfg.vocab_size, seed=2), device=DEV)
        runs, calls = [], []
        real = mlp_chunks.run
        monkeypatch.setattr(mlp_chunks, "run", lambda *a: calls.append(a[4]) or real(*a))
        for budget in (None, (16, 1)):
            eng.ops.mlp_budget = budget
            eng.cache.reset()
            runs.append(eng.model.prefill(ids, [40], 64, eng.cache))
        assert calls == [[(0, 128), (128, 160)]] * eng.cfg.num_hidden_layers
        whole, parted = runs
        torch.testing.assert_close(parted, whole, rtol=2e-2, atol=2e-2 * whole.abs().max().item())
        assert (parted.argmax(-1) == whole.argmax(-1)).all()
    finally:
        eng.close()
