"""memory.allocator_cap on the CPU, against a fake CUDA allocator (the GPU check is in
tests/test_gpu_stream.py), and the command line's answer to running out of GPU memory."""

from __future__ import annotations

import os
import types

import pytest
import torch

import engine.run as run
from memory.allocator_cap import AllocatorCap

TOTAL = 80 << 30


@pytest.fixture
def fake_allocator(monkeypatch):
    """torch.cuda's fraction setter/getter and device properties, recorded in a dict."""
    state = {"fraction": 1.0, "calls": []}

    def set_fraction(f, index):
        assert 0.0 < f <= 1.0
        state["fraction"] = f
        state["calls"].append((f, index))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: state["fraction"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=TOTAL))
    return state


def test_cap_is_the_budget_fraction_and_release_restores(fake_allocator):
    fake_allocator["fraction"] = 0.9  # someone's earlier setting
    cap = AllocatorCap(torch.device("cuda", 0), 6 << 30)
    assert fake_allocator["fraction"] == pytest.approx(6 / 80)
    assert fake_allocator["calls"][-1][1] == 0
    cap.release()
    assert fake_allocator["fraction"] == 0.9
    cap.release()  # idempotent
    assert len(fake_allocator["calls"]) == 2


def test_budget_over_the_card_caps_at_one(fake_allocator):
    AllocatorCap(torch.device("cuda", 1), 2 * TOTAL)
    assert fake_allocator["calls"] == [(1.0, 1)]


def test_release_leaves_a_later_setting_alone(fake_allocator):
    cap = AllocatorCap(torch.device("cuda", 0), 4 << 30)
    torch.cuda.set_per_process_memory_fraction(0.5, 0)  # a second engine / the user, after us
    cap.release()
    assert fake_allocator["fraction"] == 0.5


@pytest.mark.parametrize("device,budget,fragment", [("cpu", 1 << 30, "CUDA device"),
                                                   ("cuda", 0, "positive")])
def test_bad_arguments(fake_allocator, device, budget, fragment):
    with pytest.raises(ValueError, match=fragment):
        AllocatorCap(torch.device(device), budget)
    assert fake_allocator["calls"] == []


def test_cli_out_of_memory_is_one_clear_line(monkeypatch, capsys):
    import engine.cli_session as session

    def boom(args, opts, prompts):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(session, "run_session", boom)
    rc = run.main(["--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err and "more detail" not in err
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "raise --vram-budget" in err and "memreport" in err


OUTSIDE = 300 << 20  # what the fake process holds outside torch's allocator


@pytest.fixture
def fake_cap(monkeypatch):
    """engine.engine with a recording AllocatorCap and a 'cuda' device whose loading fails early."""
    import engine.engine as engine_mod
    events = []

    class FakeCap:
        def __init__(self, device, budget):
            events.append(("cap", device.type, budget))

        def release(self):
            events.append("release")

    def no_gpu(*args, **kwargs):
        raise RuntimeError("no GPU on this machine")

    monkeypatch.setattr(engine_mod, "AllocatorCap", FakeCap)
    monkeypatch.setattr(engine_mod, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (TOTAL, TOTAL))
    monkeypatch.setattr(engine_mod, "h2d_bandwidth", lambda device: (25.0, "test"))
    monkeypatch.setattr(engine_mod, "outside_allocator", lambda device: engine_mod.Outside(OUTSIDE, "test"))
    monkeypatch.setattr(engine_mod, "ModelWeights", no_gpu)
    return engine_mod, events


def test_engine_caps_before_loading_and_releases_when_loading_fails(tiny_qwen2_dir, fake_cap):
    engine_mod, events = fake_cap
    with pytest.raises(RuntimeError, match="no GPU"):
        engine_mod.Engine(tiny_qwen2_dir, engine_mod.EngineOptions(device="cuda", kernels="torch", vram_budget=1 << 30))
    assert events == [("cap", "cuda", (1 << 30) - OUTSIDE), "release"]  # the context's share comes off the cap


@pytest.mark.parametrize("opts", [dict(vram_budget=None), dict(vram_budget=1 << 30, cap_allocator=False)])
def test_no_cap_without_a_budget_or_when_turned_off(tiny_qwen2_dir, fake_cap, opts):
    engine_mod, events = fake_cap
    with pytest.raises(RuntimeError, match="no GPU"):
        engine_mod.Engine(tiny_qwen2_dir, engine_mod.EngineOptions(device="cuda", kernels="torch", **opts))
    assert events == []


def test_outside_bytes_are_measured_once_per_process_and_device(monkeypatch):
    """A second engine in the process (a second LLM in a notebook) plans with the first measurement, not
    with one that counts the first engine's kernel modules as context and adds their allowance again."""
    import memory.process_vram as pv
    calls = []

    def measure(dev):
        calls.append(dev)
        return pv.Outside(100 + len(calls), "fake")

    monkeypatch.setattr(pv, "_MEASURED", {})
    monkeypatch.setattr(pv, "_measure", measure)
    first = pv.outside_allocator(torch.device("cuda:0"))
    assert pv.outside_allocator(torch.device("cuda:0")) == first == pv.Outside(101, "fake")
    assert pv.outside_allocator(torch.device("cuda:1")) == pv.Outside(102, "fake")  # each device its own
    assert len(calls) == 2


@pytest.mark.parametrize("before, after", [
    (None, "expandable_segments:True"),
    ("max_split_size_mb:128", "max_split_size_mb:128,expandable_segments:True"),
    ("expandable_segments:False", "expandable_segments:False"),  # the user's choice stays
])
def test_expandable_segments_join_the_allocator_settings(monkeypatch, before, after):
    from memory.allocator_cap import prefer_expandable_segments
    if before is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", before)
    told = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", told.append, raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: ",".join(told), raising=False)
    assert prefer_expandable_segments() == (before != after)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == after
    # CUDA not started, but the settings may have been read already (by the first use of the allocator's
    # settings): told too, the user's others kept
    assert told == ([] if before == after else [after])


def test_settings_read_before_the_environment_changed_are_told_on_this_torch(monkeypatch):
    """Not mocked: this torch's own settings, read once before the environment names expandable segments
    (the CPU build keeps the CUDA allocator's settings too)."""
    from memory.allocator_cap import prefer_expandable_segments
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if get is None or getattr(torch._C, "_accelerator_setAllocatorSettings", None) is None:
        pytest.skip("this torch has no allocator settings API")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    torch._C._accelerator_setAllocatorSettings("expandable_segments:False")  # read and fixed without them
    assert "expandable_segments:True" not in get()
    try:
        assert prefer_expandable_segments()
        assert "expandable_segments:True" in get()
    finally:
        torch._C._accelerator_setAllocatorSettings("expandable_segments:False")


def test_expandable_segments_reach_a_started_allocator(monkeypatch):
    from memory.allocator_cap import prefer_expandable_segments
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    told = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", told.append, raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: ",".join(told), raising=False)
    assert prefer_expandable_segments()
    assert told == ["expandable_segments:True"]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    told.clear()
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", lambda conf: None)  # a setter that takes nothing
    assert not prefer_expandable_segments()  # said so in the log
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings")
    assert not prefer_expandable_segments()  # no way to tell it: off, and said so in the log
