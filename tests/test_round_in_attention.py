"""``LAYERSTREAM_ROUND_IN_ATTENTION=1``: decode layers let the attention's epilogue round o_proj's x
(kernels/attention_qgemv.py) instead of a rounding launch before the int8-x GEMV. Same codes, same GEMV config:
the same tokens and logits as without it. Triton in its interpreter on the CPU (bf16: the int8-x GEMV is not used
for fp32 x)."""
from __future__ import annotations

import os

import pytest

from engine.generate import generate
from engine.sampling import SamplingParams
from tests.helpers import make_engine, random_prompts

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton runs on CPU tensors only in its interpreter (set by conftest without "
                                       "a GPU)")


def test_rounding_in_the_attention_keeps_the_tokens(tmp_path, monkeypatch):
    from engine.synth.writer import synthesize
    from kernels import attention_qgemv, qgemv

    real = qgemv._candidates
    pick = qgemv.config(16, 32, 1, variant=4)

    def int8_x_first(block_m, n, k, sms, group=128, bits=4, int8_x=False):  # every GEMV the fused paths may take
        return [pick] if int8_x else real(block_m, n, k, sms, group, bits, int8_x)
    monkeypatch.setattr(qgemv, "_candidates", int8_x_first)
    d = synthesize("tiny-qwen3", tmp_path / "awq", quant="awq", layers=2, device="cpu")  # head dim 32
    calls = []
    fused = attention_qgemv.attention_qgemv
    def counted(*args, **kwargs):
        out = fused(*args, **kwargs)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(attention_qgemv, "attention_qgemv", counted)
    prompts = random_prompts([6], 500, seed=2)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LAYERSTREAM_ROUND_IN_ATTENTION", flag)
        monkeypatch.setattr(qgemv, "_TUNED", {})
        eng = make_engine(d, dtype="bf16", kernels="triton", cuda_graph=False)
        runs[flag] = generate(eng, prompts, SamplingParams(), max_new_tokens=5).token_ids
        eng.close()
        assert bool(calls) == (flag == "1")
    # both layers, every decode step; only the very first declines: o_proj's GEMV is not tuned yet (that call tunes it)
    assert len(calls) >= 2 * 4 and calls[0] is False and all(calls[1:])
    assert runs["0"] == runs["1"]
