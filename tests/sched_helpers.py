"""Shared by the scheduler tests (tests/test_serving_scheduler.py, tests/test_serving_steps.py): a batch-1 and a
batch-4 tiny engine, a request's tokens alone, stepping a scheduler until every sequence is done."""

from __future__ import annotations

import pytest

from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine


@pytest.fixture(scope="module")
def engines(tiny_qwen2_dir):
    """(a batch-1 engine for references, a batch-4 engine for the scheduler), both never stopping at eos."""
    single = make_engine(tiny_qwen2_dir, batch=1, max_context=64)
    multi = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=16)
    yield single, multi
    single.close()
    multi.close()


def alone(engine, prompt: list[int], n: int, params: TokenParams | None = None) -> list[int]:
    return generate(engine, [prompt], params or TokenParams(), max_new_tokens=n).token_ids[0]


def run_all(sched: Scheduler, seqs: list[Sequence], arrivals: dict[int, int] | None = None) -> int:
    """Step until every sequence is finished; sequence i is added before step arrivals.get(i, 0)."""
    arrivals = arrivals or {}
    step = 0
    while not all(s.finished for s in seqs):
        for i, s in enumerate(seqs):
            if arrivals.get(i, 0) == step:
                sched.add(s)
        sched.step()
        step += 1
        assert step < 500, "scheduler made no progress"
    return step


def scheduler_for(kv: str, tiny_qwen2_dir, multi, **kw) -> Scheduler:
    """A slots scheduler on the shared engine, or a paged one (block size in ``kv``) on a fresh engine."""
    if kv == "slots":
        return Scheduler(multi, **kw)
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=16)
    return Scheduler(eng, kv_cache="paged", block_size=int(kv.split("-")[1]), **kw)
