"""The MLP of a prefill longer than ``engine.ops.MLP_ROWS`` rows against transformers.

Dense weights never hold the [rows, 2I] gate_up projection whole: TorchOps runs gate_up and the
SwiGLU ``MLP_ROWS`` rows at a time, TritonOps fuses the SwiGLU into the GEMM (kernels.gemm_swiglu,
interpreted here). Both must give transformers' logits at every position of a 150-token prompt
(three blocks, the last one short), and ``add_rmsnorm_mlp`` must equal the unfused ops it replaces.
"""
from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache
from engine.ops import MLP_ROWS, TorchOps
from tests.helpers import forward_prefill, load_ours, make_hf_model, random_prompts, rel_max_err

T = 2 * MLP_ROWS + 22  # three row blocks, the last one short
TOL = {"torch": 1e-4, "triton": 1e-3}  # as tests/test_model_parity.py (fp32)


def _ops(kind: str) -> TorchOps:
    if kind == "torch":
        return TorchOps()
    from engine.ops import TritonOps
    return TritonOps()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tokenizer_dir):
    return make_hf_model("qwen3", tmp_path_factory.mktemp("hf"), tokenizer_dir=tokenizer_dir, seed=123)


@pytest.mark.parametrize("kind", ["torch", "triton"])
def test_long_prefill_matches_transformers(qwen3, kind):
    ref_model, d = qwen3
    ours = load_ours(d, ops=_ops(kind), max_context=T + 2)
    prompt = random_prompts([T], ours.cfg.vocab_size, seed=5)[0]
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt])).logits.float()[0]
    cache = KVCache(ours.cfg, 1, T + 2, torch.float32, "cpu")
    logits = forward_prefill(ours.model, cache, torch.tensor([prompt]), last_only=False)[0]
    err = rel_max_err(logits, ref)
    assert err <= TOL[kind], f"{kind}: {T}-token prefill, max rel err {err:.2e}"


@pytest.mark.parametrize("kind", ["torch", "triton"])
@pytest.mark.parametrize("rows", [MLP_ROWS, MLP_ROWS + 1, 3 * MLP_ROWS - 5])
def test_add_rmsnorm_mlp_equals_the_unfused_ops(kind, rows):
    ops = _ops(kind)
    g = torch.Generator().manual_seed(rows)
    hidden, inter = 48, 40
    x, res = (torch.randn(1, rows, hidden, generator=g) for _ in range(2))
    norm_w = 1 + 0.1 * torch.randn(hidden, generator=g)
    w_gu = torch.randn(2 * inter, hidden, generator=g) * hidden ** -0.5
    w_down = torch.randn(hidden, inter, generator=g) * inter ** -0.5
    got, got_res = ops.add_rmsnorm_mlp(x, res, norm_w, 1e-6, w_gu, w_down)
    gate_up, want_res = ops.add_rmsnorm_linear(x, res, norm_w, 1e-6, w_gu)
    want = ops.swiglu_linear(gate_up, w_down)
    assert got.shape == (1, rows, hidden) and torch.equal(got_res, want_res)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
