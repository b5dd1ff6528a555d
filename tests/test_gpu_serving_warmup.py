"""On a CUDA GPU: after the server's warm-up (engine/serving/warmup.py), requests of any prompt length and
arrival pattern compile no Triton kernel and tune no new shape, and still get their own tokens.
Skipped without CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch

from engine.engine import Engine, EngineOptions
from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from engine.serving import warmup
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import random_prompts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_TUNERS = ("gemm", "gemv", "attention_prefill", "attention_decode", "rope")  # kernels with a _TUNED dict


def _engine(model_dir, batch: int) -> Engine:
    engine = Engine(model_dir, EngineOptions(device="cuda", dtype="fp32", batch=batch, max_context=512,
                                             prefill_chunk=256))
    engine.tokenizer.eos_ids = set()
    return engine


def _tuned() -> dict[str, set]:
    return {name: set(importlib.import_module(f"kernels.{name}")._TUNED) for name in _TUNERS}


@pytest.mark.parametrize("kv", ["slots", "paged"])
def test_requests_after_the_warm_up_compile_and_tune_nothing(tiny_qwen2_dir, monkeypatch, kv):
    import triton

    monkeypatch.setattr(warmup.ahead, "wanted", lambda model: True)  # compile-only passes without shipped picks too
    eng = _engine(tiny_qwen2_dir, 4)
    single = None
    try:
        sched = Scheduler(eng, kv_cache=kv, block_size=16)
        report = warmup.warm_up(sched)
        assert not report.skipped and not report.cut and any(s.dry for s in report.steps)
        tuned, compiled = _tuned(), []
        # called by Triton before compiling a specialisation this process has not compiled yet
        monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", lambda **k: compiled.append(k["repr"][:200]))
        # 300 and 411: longer than the chunk, a later slice after 256 cached tokens
        lengths, news = [3, 70, 300, 200, 256, 130, 411, 17, 255, 90], [8, 5, 6, 12, 3, 9, 9, 20, 4, 7]
        prompts = random_prompts(lengths, eng.cfg.vocab_size, seed=8)
        seqs = [Sequence(p, SamplingParams(max_tokens=n), eng.tokenizer) for p, n in zip(prompts, news)]
        for step in range(1000):
            for i, s in enumerate(seqs):
                if step == 3 * i:  # staggered: prompts join running decodes, several share a step
                    sched.add(s)
            sched.step()
            if all(s.finished for s in seqs):
                break
        monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
        assert compiled == [], f"kernels compiled while serving: {compiled}"
        assert _tuned() == tuned, "shapes tuned while serving"
        single = _engine(tiny_qwen2_dir, 1)
        for p, s, n in zip(prompts, seqs, news):
            assert s.output_ids == generate(single, [p], TokenParams(), max_new_tokens=n).token_ids[0]
    finally:
        eng.close()
        if single is not None:
            single.close()
