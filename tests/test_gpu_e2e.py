"""GPU-only, on a big synthetic checkpoint: the Triton path against the torch path and fp32.

Set ``LAYERSTREAM_BIG_MODEL`` to a model directory (e.g. ``python -m tools.synth --preset
qwen2.5-7b --out DIR --device cuda``); without it, or without CUDA, the tests are skipped.

A random-weight 7B is chaotic in bf16: measured on an H200 (2026-11-22), the torch bf16
path's prefill logits differ from fp32 by 6.2% (relative L2) and its greedy tokens leave the
fp32 ones after the first token; the Triton bf16 path differs by 5.7%. So in bf16 the test
asks the Triton path to be as close to fp32 as the torch path is, and token-for-token
equality is checked in fp32, where both paths compute the same function exactly enough.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from engine.engine import Engine, EngineOptions
from engine.generate import decode_step, prefill

BIG = os.environ.get("LAYERSTREAM_BIG_MODEL")
# first-call tuning of every fp32 shape made the 32-step fp32 run outlast a 150 s limit on an
# H200: the default launch configs are enough for a correctness check
os.environ.setdefault("KERNELS_AUTOTUNE", "0")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (torch.cuda.is_available() and BIG),
                                                    reason="needs CUDA and LAYERSTREAM_BIG_MODEL")]
PROMPT = list(range(1000, 1040))


def _greedy(kernels: str, dtype: str, steps: int) -> tuple[list[int], torch.Tensor]:
    engine = Engine(BIG, EngineOptions(device="cuda", kernels=kernels, dtype=dtype, max_context=256))
    logits = prefill(engine, [PROMPT])
    first, toks, pos = logits[0].float().cpu(), [], len(PROMPT)
    for _ in range(steps):
        tok = logits.argmax(-1)
        toks.append(int(tok))
        logits = decode_step(engine, tok, [pos])
        pos += 1
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return toks, first


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_triton_bf16_as_close_to_fp32_as_torch_bf16():
    _, ref = _greedy("torch", "fp32", 1)
    _, torch_bf16 = _greedy("torch", "bf16", 1)
    _, triton_bf16 = _greedy("triton", "bf16", 1)
    err_torch, err_triton = _rel(torch_bf16, ref), _rel(triton_bf16, ref)
    assert err_triton <= 1.25 * err_torch, f"triton bf16 error {err_triton:.3e} vs torch bf16 {err_torch:.3e}"


def test_triton_matches_torch_greedy_32_steps_fp32():
    ref_toks, ref = _greedy("torch", "fp32", 32)
    toks, first = _greedy("triton", "fp32", 32)
    assert _rel(first, ref) < 1e-3
    assert toks == ref_toks
