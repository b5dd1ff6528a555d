"""The serving scheduler on a CUDA GPU: Triton kernels, decode CUDA graphs (slots) and the block-table
decode kernel (paged) give each request the tokens it gets alone. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine, EngineOptions
from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import random_prompts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _engine(model_dir, batch: int) -> Engine:
    engine = Engine(model_dir, EngineOptions(device="cuda", dtype="fp32", batch=batch, max_context=128,
                                             prefill_chunk=64))
    engine.tokenizer.eos_ids = set()  # fixed-length streams
    return engine


@pytest.mark.parametrize("kv", ["slots", "paged"])
def test_scheduler_on_cuda_matches_each_request_alone(tiny_qwen2_dir, kv):
    single, multi = _engine(tiny_qwen2_dir, 1), _engine(tiny_qwen2_dir, 4)
    try:
        assert multi.graph is not None, "the decode graph should be captured on CUDA"
        prompts = random_prompts([40, 3, 17, 9, 25, 1], multi.cfg.vocab_size, seed=4)
        sched = Scheduler(multi, kv_cache=kv, block_size=16)
        seqs = [Sequence(p, SamplingParams(max_tokens=8), multi.tokenizer) for p in prompts]
        for step in range(400):
            for i, s in enumerate(seqs):
                if step == 2 * i:  # staggered arrivals: joins next to running decodes
                    sched.add(s)
            sched.step()
            if all(s.finished for s in seqs):
                break
        for p, s in zip(prompts, seqs):
            assert s.output_ids == generate(single, [p], TokenParams(), max_new_tokens=8).token_ids[0]
        if kv == "paged":
            assert sched.runner.paged[0].direct_steps > 0
    finally:
        single.close()
        multi.close()
