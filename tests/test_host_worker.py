"""The host lane's worker thread and core choice (engine/host_worker.py, engine/host_lane.py).

Checked: the core choice on synthetic topologies (SMT siblings, packages, gaps in the allowed set,
too few cores); the worker runs calls in order on its own thread with its affinity and torch thread
count, hands exceptions back and stops on close; an engine's host layers run on the worker, give
the all-resident engine's tokens (fp32, resident / streamed / host mixes, batch > 1, prefill then
decode, runs of consecutive host layers), and no worker thread outlives the engine.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from engine.footprint import min_budget
from engine.generate import generate
from engine.host_lane import HostOps
from engine.host_worker import (CorePick, HostWorker, cpu_ranges, cpu_topology, pick_cores, reserved_cores,
                                run_pinned)
from engine.run import main
from engine.sampling import SamplingParams
from memory.placement import DISK_RING
from tests.helpers import make_engine, make_hf_model, random_prompts

SMT8 = {c: (0, c % 4) for c in range(8)}  # 4 cores, siblings c and c + 4
TWO_SOCKETS = {c: (c // 4, c % 4) for c in range(8)}  # 2 packages of 4 cores, no SMT


@pytest.mark.parametrize("allowed,core_of,reserved,cpus,threads,physical", [
    (range(16), {}, 1, tuple(range(1, 16)), 15, 16),  # no topology: every CPU a core of its own
    (range(16), {}, 2, tuple(range(2, 16)), 14, 16),  # with a disk tier
    (range(8), SMT8, 1, (1, 2, 3, 5, 6, 7), 3, 4),  # siblings kept together, one thread per core
    (range(8), TWO_SOCKETS, 2, (2, 3, 4, 5, 6, 7), 6, 8),  # core ids repeat across packages
    ({0, 4, 2, 6}, SMT8, 1, (2, 6), 1, 2),  # only some CPUs allowed (taskset)
    ({5, 6, 7}, SMT8, 1, (6, 7), 2, 3),  # the lowest allowed core is the one left over
    ([3], {}, 1, (), 1, 1),  # one core: not pinned, one thread
    (range(2), {}, 2, (), 1, 2),  # every core wanted by the streamer
    (range(4), {}, 0, (0, 1, 2, 3), 4, 4),
])
def test_pick_cores(allowed, core_of, reserved, cpus, threads, physical):
    pick = pick_cores(allowed, core_of, reserved)
    assert (pick.cpus, pick.threads, pick.physical, pick.reserved) == (cpus, threads, physical, reserved)
    assert ("pinned to CPUs" in pick.describe()) == bool(cpus)


@pytest.mark.parametrize("cpus,text", [((0, 1, 2, 3, 8, 10, 11), "0-3,8,10-11"), ((5,), "5"), ((7, 3, 4), "3-4,7")])
def test_cpu_ranges(cpus, text):
    assert cpu_ranges(cpus) == text


def test_reserved_cores_and_this_machine():
    assert reserved_cores(False) == 1 and reserved_cores(True) == 2
    topo = cpu_topology()
    if Path("/sys/devices/system/cpu/cpu0/topology/core_id").exists():
        assert 0 in topo and len(topo) >= len(os.sched_getaffinity(0))


def test_worker_runs_in_order_on_its_thread_pinned():
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pick = CorePick(tuple(allowed[-1:]), 1, len(allowed), 0) if allowed else CorePick((), 1, 1, 1)
    main_threads = torch.get_num_threads()
    worker = HostWorker(pick, name="host-lane-test")
    seen = []

    def job(k):
        seen.append(k)
        affinity = tuple(sorted(os.sched_getaffinity(0))) if allowed else ()
        return threading.current_thread().name, torch.get_num_threads(), affinity, torch.is_grad_enabled()

    futures = [worker.submit(job, k) for k in range(5)]
    results = [f.result(timeout=30) for f in futures]
    assert seen == list(range(5))
    assert all(r == ("host-lane-test", 1, pick.cpus, False) for r in results)
    assert worker.pinned == bool(allowed)
    assert torch.get_num_threads() == main_threads  # the main thread keeps its own count
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(timeout=30)
    assert worker.submit(job, 5).result(timeout=30)[0] == "host-lane-test"  # still serving after an error
    worker.close()
    worker.close()
    assert not worker.alive
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(job, 6)


def test_run_pinned_measures_with_the_workers_threads():
    before = len([t for t in threading.enumerate() if t.name == "host-lane-probe"])
    pick = CorePick((), 1, 1, 1)
    assert run_pinned(pick, lambda a: (a, torch.get_num_threads(), threading.current_thread().name), 7) == \
        (7, 1, "host-lane-probe")
    with pytest.raises(ValueError, match="bad"):
        run_pinned(pick, lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert len([t for t in threading.enumerate() if t.name == "host-lane-probe"]) == before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("host_worker"), tokenizer_dir=tokenizer_dir)
    return d


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "host-lane"]


# (resident layers, host budget in layers (None: all pinned), --host-compute): the tiny model has 3 layers
MIXES = [(0, None, 3), (1, None, 2), (0, None, 2), (0, 1, 1)]


@pytest.mark.parametrize("mix", MIXES, ids=["all-host", "resident+host", "streamed+host", "disk+host"])
def test_host_layers_run_on_the_worker(model_dir, mix, monkeypatch):
    resident, pinned, n = mix
    lengths = [5, 12, 8]
    before = len(_lane_threads())
    ref = make_engine(model_dir, batch=3)
    low = min_budget(ref.cfg, torch.float32, batch=3, max_context=64, prefill_chunk=4)
    layer = ref.plan.layer_bytes
    host = (1 << 30) if pinned is None else (pinned + DISK_RING) * layer  # (the disk tier's ring too)
    ours = make_engine(model_dir, batch=3, prefill_chunk=4, vram_budget=low + resident * layer, host_budget=host,
                       host_compute=n)
    lane = ours.model.host
    assert len(lane.layers) == n and len(_lane_threads()) == before + 1
    if n == 3:
        assert lane.run_from(lane.layers[0]) == (0, 1, 2)  # one trip to the worker for the three layers
    threads = set()
    real = HostOps.linear

    def spy(self, x, w, b=None):
        threads.add(threading.current_thread().name)
        return real(self, x, w, b)

    monkeypatch.setattr(HostOps, "linear", spy)
    prompts = random_prompts(lengths, ref.cfg.vocab_size, seed=21)
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=5).token_ids
    assert generate(ours, prompts, SamplingParams(), max_new_tokens=5).token_ids == want
    assert threads == {"host-lane"} and lane.steps == 4
    ours.close()
    ref.close()
    assert len(_lane_threads()) == before and not lane.worker.alive


def test_show_plan_states_the_worker_cores(model_dir, capsys):
    probe = make_engine(model_dir)
    low = min_budget(probe.cfg, torch.float32, max_context=64, prefill_chunk=2048)
    probe.close()
    before = len(_lane_threads())
    rc = main(["--model", str(model_dir), "--prompt", "hi", "--no-chat", "--device", "cpu", "--max-context", "64",
               "--dtype", "fp32", "--vram-budget", f"{low}B", "--host-compute", "1", "--max-new-tokens", "2",
               "--show-plan"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "host lane worker:" in err and "torch thread" in err
    assert len(_lane_threads()) == before  # the CLI closes its engine
