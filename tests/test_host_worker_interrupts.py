"""The host lane's worker under Ctrl-C, at exit and at start (CPU). A Ctrl-C while a decode step waits for its host
layers lets the step's call end before it is raised (left running, it wrote the host KV cache after the next
generation's prefill had filled it); closing the worker finishes its join before a Ctrl-C lands; the worker's torch
thread count stays its own; a worker that cannot start says so at once."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.generate import generate
from engine.host_worker import CorePick, HostWorker
from engine.sampling import SamplingParams
from tests.helpers import make_engine, make_hf_model, random_prompts
from tests.test_host_lane import _host_engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("worker_int"), tokenizer_dir=tokenizer_dir)
    return d


def test_a_ctrl_c_while_waiting_for_the_host_layers_lets_their_call_end_first(model_dir, monkeypatch):
    """The third decode step's wait for its host layers is interrupted while the worker still computes them (slowed
    to 0.5 s): the generation ends interrupted only after that call ended, and the next generation, started at
    once with a longer prompt, gets the all-resident engine's tokens (its host keys are not overwritten)."""
    first, second = random_prompts([6], 512, seed=1)[0], random_prompts([20], 512, seed=2)[0]
    ref = make_engine(model_dir)
    want = generate(ref, [second], SamplingParams(), max_new_tokens=8).token_ids
    ref.close()
    eng = _host_engine(model_dir, 1, 0, None, 2)
    worker, ended, waits = eng.model.host.worker, [], [0]
    real_submit = worker.submit

    def submit(fn, *args):
        waits[0] += 1
        if waits[0] != 3:
            return real_submit(fn, *args)

        def slow(*a):  # on the worker: this call of host layers takes 0.5 s more
            time.sleep(0.5)
            out = fn(*a)
            ended.append(time.perf_counter())
            return out
        fut = real_submit(slow, *args)

        def interrupted(timeout=None):  # its wait: the user presses Ctrl-C
            raise KeyboardInterrupt
        fut.result = interrupted
        return fut
    monkeypatch.setattr(worker, "submit", submit)
    out = generate(eng, [first], SamplingParams(), max_new_tokens=16)
    raised = time.perf_counter()
    assert out.finish_reasons == ["interrupted"] and waits[0] == 3
    assert ended and ended[0] <= raised  # the interrupted call had ended
    monkeypatch.undo()
    assert generate(eng, [second], SamplingParams(), max_new_tokens=8).token_ids == want
    eng.close()


def _slow_worker() -> tuple[HostWorker, list]:
    worker, done = HostWorker(CorePick((), 1, 1, 0)), []
    worker.submit(lambda: (time.sleep(1.0), done.append(True)))
    return worker, done


def _ctrl_c_in(delay: float) -> threading.Timer:
    main = threading.main_thread().ident
    timer = threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("call", ["drain", "close"])
def test_a_ctrl_c_while_the_worker_finishes_lands_after_it(call):
    """A Ctrl-C while drain() or close() waits for a call in flight is raised once that call has ended (close: once
    the thread has stopped; a process exiting with the worker inside torch aborts)."""
    worker, done = _slow_worker()
    timer = _ctrl_c_in(0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            getattr(worker, call)()
    finally:
        timer.cancel()  # a call that returned early (the bug) must not interrupt the test session later
    assert done == [True] and worker.alive == (call == "drain")
    worker.close()
    assert not worker.alive


def test_the_workers_thread_count_is_its_own():
    """The worker runs torch with its pick's thread count; the caller's count, and that of threads started later
    (the load's packing pool), stay the caller's."""
    def in_new_thread() -> int:
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
        t.start()
        t.join()
        return box[0]
    before = torch.get_num_threads()
    worker = HostWorker(CorePick((), 1, 1, 0))
    try:
        assert worker.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == before and in_new_thread() == before
    finally:
        worker.close()


def test_a_worker_that_cannot_start_says_so(monkeypatch):
    """A failure in the worker's setup is raised by its constructor (a later submit would have waited forever)."""
    def broken(self):
        raise OSError("no such CPU")
    monkeypatch.setattr(HostWorker, "_setup", broken)
    with pytest.raises(RuntimeError, match="host lane worker could not start: no such CPU"):
        HostWorker(CorePick((), 1, 1, 0))
