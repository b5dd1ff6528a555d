"""The server's hand-over of outputs from the engine thread to the event loop (engine/serving/delivery.py), and
the scheduler's held outputs (given to their sinks once the next pass is queued)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.serving.delivery import LoopDelivery


class _Counting:
    """An event loop's call_soon_threadsafe, counted."""

    def __init__(self, aio: asyncio.AbstractEventLoop) -> None:
        self.aio, self.calls = aio, 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1
        return self.aio.call_soon_threadsafe(fn, *args)


def test_a_steps_outputs_wake_the_loop_once_and_keep_their_order():
    """16 streams' outputs of 50 steps from another thread: each queue gets its own outputs in order, and a
    step's 16 outputs (put while the loop is held up) cost one wake-up, not 16."""
    async def run() -> tuple[list[list[tuple[int, int]]], int]:
        aio = asyncio.get_running_loop()
        counting = _Counting(aio)
        delivery = LoopDelivery(counting)  # type: ignore[arg-type]
        queues = [asyncio.Queue() for _ in range(16)]
        sinks = [delivery.sink(q) for q in queues]
        released = [threading.Event() for _ in range(50)]

        def engine() -> None:  # a step: every stream's output, then wait for the loop to take them
            for step in range(50):
                for i, sink in enumerate(sinks):
                    sink((i, step))
                released[step].wait(5)

        worker = threading.Thread(target=engine)
        worker.start()
        got: list[list[tuple[int, int]]] = [[] for _ in queues]
        for step in range(50):
            for i, q in enumerate(queues):
                got[i].append(await asyncio.wait_for(q.get(), 5))
            released[step].set()
        worker.join(5)
        return got, counting.calls

    got, calls = asyncio.run(run())
    assert got == [[(i, step) for step in range(50)] for i in range(16)]
    assert 50 <= calls < 16 * 50 / 4  # about one a step (a step's first output may land while the loop delivers)


@pytest.fixture(scope="module")
def held(tiny_qwen2_dir):
    """A batch-4 scheduler holding its outputs as on a GPU, with every pass and sink call in one log."""
    from engine.serving.scheduler import Scheduler
    from tests.helpers import make_engine

    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=16)
    assert not Scheduler(eng, hold_outputs=True).hold_outputs  # a CPU pass runs as it is queued: nothing held
    sched = Scheduler(eng, hold_outputs=True)
    sched.hold_outputs = True
    log: list = []
    wait = sched.runner.nonfinite  # where the host waits for a pass
    sched.runner.nonfinite = lambda *a, **k: log.append("wait") or wait(*a, **k)
    yield sched, log
    eng.close()


def _seq(sched, log, i: int, prompt: list[int], n: int):
    from engine.serving.params import SamplingParams
    from engine.serving.sequence import Sequence
    return Sequence(prompt, SamplingParams(max_tokens=n, ignore_eos=True), sched.engine.tokenizer,
                    sink=lambda out: log.append((i, tuple(out.token_ids), out.finished, out.finish_reason, out)))


def test_held_outputs_reach_their_sinks_once_the_next_pass_is_queued(held):
    sched, log = held
    seqs = [_seq(sched, log, i, [3 + i, 5, 7], n) for i, n in enumerate((4, 6))]
    for s in seqs:
        sched.add(s)
    log.clear()
    by_step = []
    while sched.has_work():
        outs = sched.step()
        by_step.append(outs)
        delivered = [e[4] for e in log if e != "wait"]
        for o in outs:  # this step's outputs: only the finished ones (and all, once nothing runs) are out
            assert any(o is d for d in delivered) == (o.finished or not sched.running)
    sink_calls = [e for e in log if e != "wait"]
    for i, s in enumerate(seqs):  # every token reached its sink, in order, the end last
        mine = [e for e in sink_calls if e[0] == i]
        assert [t for e in mine for t in e[1]] == s.output_ids and len(s.output_ids) == (4, 6)[i]
        assert [e[2] for e in mine] == [False] * (len(mine) - 1) + [True]
    waits = [k for k, e in enumerate(log) if e == "wait"]
    assert len(waits) == len(by_step)
    for k, outs in enumerate(by_step[:-1]):  # held: out while the next step's pass is waited for, not before
        for o in outs:
            at = next(j for j, e in enumerate(log) if e != "wait" and e[4] is o)
            assert (waits[k] < at < waits[k + 1]) if not o.finished else at > waits[k]


def test_a_prompt_pass_and_an_abort_deliver_the_held_outputs_first(held):
    sched, log = held
    first = _seq(sched, log, 0, [4, 2], 8)
    sched.add(first)
    sched.step()
    sched.step()  # first's two tokens: the second held
    assert sched._held
    log.clear()
    late = _seq(sched, log, 1, [9, 9, 9], 3)
    sched.add(late)  # its prompt makes the next pass a prefill: the held token goes out before it
    sched.step()
    assert log[0][0] == 0 and log[1] == "wait"
    assert sched._held
    log.clear()
    assert sched.abort(first.seq_id)  # the held tokens (first's and late's first), then first's end
    assert [(e[0], e[2], e[3]) for e in log] == [(0, False, None), (1, False, None), (0, True, "abort")]
    assert sched.abort(late.seq_id)
    assert not sched.has_work() and not sched._held
