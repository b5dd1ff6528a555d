"""GPU-only, on a big synthetic checkpoint: Triton kernels give the torch path's greedy tokens.

Set ``LAYERSTREAM_BIG_MODEL`` to a model directory (e.g. ``python -m tools.synth --preset
qwen2.5-7b --out DIR --device cuda``); without it, or without CUDA, the test is skipped.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from engine.engine import Engine, EngineOptions
from engine.generate import decode_step, prefill

BIG = os.environ.get("LAYERSTREAM_BIG_MODEL")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and BIG), reason="needs CUDA and LAYERSTREAM_BIG_MODEL")
STEPS = 32


def _greedy(kernels: str, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    engine = Engine(BIG, EngineOptions(device="cuda", kernels=kernels, max_context=256))
    logits = prefill(engine, [prompt])
    toks, all_logits, pos = [], [], len(prompt)
    for _ in range(STEPS):
        all_logits.append(logits[0].cpu())
        tok = logits.argmax(-1)
        toks.append(int(tok))
        logits = decode_step(engine, tok, [pos])
        pos += 1
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return toks, all_logits


def test_triton_matches_torch_greedy_32_steps():
    prompt = list(range(1000, 1040))
    ref_toks, ref_logits = _greedy("torch", prompt)
    toks, logits = _greedy("triton", prompt)
    first_logits = logits[0].float()
    rel = (first_logits - ref_logits[0].float()).norm() / ref_logits[0].float().norm()
    assert rel < 2e-2, f"prefill logits differ by {rel:.2e} (relative L2); bf16 tolerance is 2e-2"
    assert toks == ref_toks, f"greedy tokens diverge at step {next(i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b)}"
