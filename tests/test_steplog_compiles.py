"""``--step-log``'s ``compiles`` column (engine/serving/steplog.py): Triton's ``jit_cache_hook`` counts the
kernel specialisations each step had to build (and names them), chained to a hook installed before it and removed on close.
A stand-in for triton.knobs.runtime (the CPU interpreter never calls the hook)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from engine.serving import steplog
from engine.serving.scheduler import StepStats


def _stats(step: int) -> StepStats:
    st = StepStats()
    st.steps, st.last_step_s, st.last_batch, st.last_tokens = step, 0.01, 1, 1
    return st


def test_each_step_counts_the_builds_during_it_and_close_restores_the_hook(tmp_path, monkeypatch):
    seen = []

    def before(**kw):
        seen.append(kw["key"])
        return kw["key"] == "skip"  # a hook installed before may ask Triton to skip a build

    runtime = SimpleNamespace(jit_cache_hook=before)
    monkeypatch.setattr(steplog, "hook_knobs", lambda: runtime)
    log = steplog.StepLog(tmp_path / "steps.jsonl")
    assert runtime.jit_cache_hook == log._count
    assert runtime.jit_cache_hook(key="a", repr="_k1[num_warps=4](M: i32:16)") is False
    assert runtime.jit_cache_hook(key="skip", repr="_k2[num_warps=8](M: i32)") is True
    log(_stats(1))
    log(_stats(2))
    runtime.jit_cache_hook(key="b", repr="_k1[num_warps=4]()", compile={"constants": {(3,): 64}, "configs": [{(1,): 16}]})
    log(_stats(3))
    log.close()
    assert runtime.jit_cache_hook is before and seen == ["a", "skip", "b"]
    rows = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["compiles"] for r in rows] == [2, 0, 1]
    # which builds: Triton's description of each, only on steps that built something
    assert [r.get("built") for r in rows] == [["_k1[num_warps=4](M: i32:16)", "_k2[num_warps=8](M: i32)"], None,
                                              ["_k1[num_warps=4]() constants={(3,): 64} configs=[{(1,): 16}]"]]


def test_without_a_hook_before_it_builds_are_never_skipped(tmp_path, monkeypatch):
    runtime = SimpleNamespace(jit_cache_hook=None)
    monkeypatch.setattr(steplog, "hook_knobs", lambda: runtime)
    log = steplog.StepLog(tmp_path / "steps.jsonl")
    assert runtime.jit_cache_hook(key="a", repr="k") is False
    log.close()
    assert runtime.jit_cache_hook is None


def test_on_a_gpu_each_step_records_its_peak_allocation_and_resets_it(tmp_path, monkeypatch):
    cuda = steplog.torch.cuda
    peaks = [700 << 20, 300 << 20]
    resets = []
    monkeypatch.setattr(steplog, "hook_knobs", lambda: None)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: peaks[len(resets)])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    monkeypatch.setattr(cuda, "memory_reserved", lambda: 900 << 20)
    log = steplog.StepLog(tmp_path / "steps.jsonl")
    log(_stats(1))
    log(_stats(2))
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(r["peak_mib"], r["reserved_mib"]) for r in rows] == [(700, 900), (300, 900)] and len(resets) == 2


def test_without_cuda_in_use_a_step_has_no_memory_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(steplog, "hook_knobs", lambda: None)
    monkeypatch.setattr(steplog.torch.cuda, "is_initialized", lambda: False)
    log = steplog.StepLog(tmp_path / "steps.jsonl")
    log(_stats(1))
    log.close()
    assert "peak_mib" not in json.loads((tmp_path / "steps.jsonl").read_text())


def test_alloc_counts_give_what_grew_in_each_step():
    dev = {"num_device_alloc": 10, "num_alloc_retries": 0, "num_sync_all_streams": 2, "other": 5}
    host = {"num_host_alloc": 3, "host_alloc_time": {"total": 1500, "max": 900}}  # nested, as torch gives them
    counts = steplog.AllocCounts(lambda: dict(dev), lambda: dict(host))
    assert counts.step() == {}  # nothing grew since it was made
    dev.update(num_device_alloc=13, other=9)
    host.update({"num_host_alloc": 51, "host_alloc_time": {"total": 42500, "max": 900}})
    assert counts.step() == {"dev_allocs": 3, "host_allocs": 48, "host_alloc_us": 41000}
    dev.update(num_alloc_retries=1, num_sync_all_streams=3)
    assert counts.step() == {"alloc_retries": 1, "alloc_syncs": 1}
    assert counts.step() == {}


def test_alloc_counts_without_cuda_are_empty():
    counts = steplog.AllocCounts(lambda: {}, lambda: {})
    assert counts.step() == {}
    if not torch.cuda.is_available():  # the real readers on this machine
        assert steplog.AllocCounts().step() == {}
