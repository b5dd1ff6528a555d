"""A serving pass that fails partway on the paged KV cache leaves nothing behind that a later pass writes: its last
gathered copy of keys and values pointed at the failed request's blocks, which go back to the free list when it is
aborted; the next pass wrote it back into whatever those blocks then held (with the in-place decode reads of
``--kernels triton``: after the new owner's keys, corrupting them). CPU: torch ops with the Triton paged decode
attention in its interpreter, as ``runner.direct`` installs it."""

from __future__ import annotations

import os

import pytest

from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from engine.serving.paged_cache import PagedOps
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the paged decode attention runs on CPU tensors only in Triton's interpreter")


def _served(model_dir, cached, failing, prompt, fail: bool) -> list[int]:
    eng = make_engine(model_dir, batch=2, max_context=64, prefill_chunk=16)
    sched = Scheduler(eng, kv_cache="paged", block_size=16, num_blocks=4)
    sched.runner.direct = True  # what --kernels triton sets (16-token blocks are read in place)
    eng.model.ops = PagedOps(eng.model.ops)
    sched.add(Sequence(cached + [3], SamplingParams(max_tokens=1), eng.tokenizer))
    while sched.has_work():  # caches the prefix block
        sched.step()
    if fail:
        sched.add(Sequence(failing, SamplingParams(max_tokens=4), eng.tokenizer))
        ops, calls, layers = eng.model.ops.base, [0], eng.cfg.num_hidden_layers
        real = ops.swiglu_linear

        def boom(gu, w):  # the third prompt pass fails at its second layer
            if gu.numel() // gu.shape[-1] > 1:
                calls[0] += 1
                if calls[0] == 2 * layers + 2:
                    raise RuntimeError("a kernel failed")
            return real(gu, w)
        ops.swiglu_linear = boom
        with pytest.raises(RuntimeError, match="a kernel failed"):
            while sched.has_work():
                sched.step()
        for s in list(sched.running):  # what the server's loop does with a failed step's requests
            sched.abort(s.seq_id)
        ops.swiglu_linear = real
    seq = Sequence(prompt, SamplingParams(max_tokens=8), eng.tokenizer)
    sched.add(seq)
    while sched.has_work():
        sched.step()
    eng.close()
    return seq.output_ids


def test_a_failed_pass_leaves_no_keys_to_write_into_another_requests_blocks(tiny_qwen2_dir):
    alone = make_engine(tiny_qwen2_dir, batch=1, max_context=64)
    cached, failing = random_prompts([16, 40], alone.cfg.vocab_size, seed=5)
    prompt = cached + [7]  # its prefix block is cached: its first pass is a decode step, reading blocks in place
    want = generate(alone, [prompt], TokenParams(), max_new_tokens=8).token_ids[0]
    alone.close()
    assert _served(tiny_qwen2_dir, cached, failing, prompt, fail=False) == want
    assert _served(tiny_qwen2_dir, cached, failing, prompt, fail=True) == want
