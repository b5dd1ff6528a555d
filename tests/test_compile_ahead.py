"""Compile ahead (kernels/ahead.py, engine/ahead.py): a dry pass's Triton launches compile in a pool
of threads, deduplicated, and launch nothing; untimed calls take cached or shipped tuning picks; the
weights' dry mode hands out slot 0 without streaming. Triton's launch is replaced by a recorder here
(no GPU); the GPU test runs the engine's dry passes for real and compares tokens."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch
from triton.runtime.jit import JITFunction

from engine import ahead as engine_ahead
from engine.footprint import min_budget
from engine.generate import generate
from engine.sampling import SamplingParams
from kernels import tuning_cache
from kernels.ahead import compile_only, launch_key
from kernels.tuning import tuning_suspended
from tests.helpers import make_engine, make_hf_model, random_prompts


def _body(x_ptr, n, BLOCK):  # never compiled here: only its JITFunction wrapper is used
    pass


class Recorder:
    """Stands in for JITFunction.run: records (thread, warmup, args, kwargs); raises on ``fail``."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, bool, tuple, dict]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, fn, *args, grid, warmup, **kwargs):
        with self.lock:
            self.calls.append((threading.get_ident(), warmup, args, kwargs))
        if self.fail:
            raise RuntimeError("out of resources")
        return "kernel"


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(JITFunction, "run", rec)
    return rec


def test_launches_compile_once_per_specialisation_and_run_nothing(recorder):
    kernel = JITFunction(_body)
    buf = torch.zeros(64)
    with compile_only(workers=2, how="threads") as stats:
        assert tuning_suspended()
        assert kernel[(1,)](buf, 32, BLOCK=16) is None  # nothing launched, nothing returned
        for _ in range(5):
            kernel[(4,)](buf, 64, BLOCK=16)  # same key: tensor dtype / alignment, int divisible by 16
        kernel[(1,)](buf[1:], 32, BLOCK=16)  # misaligned pointer: another specialisation
        kernel[(1,)](buf, 17, BLOCK=16)  # not divisible by 16
        kernel[(1,)](buf, 1, BLOCK=16)  # == 1
        kernel[(1,)](buf, 32, BLOCK=32)  # another constexpr
        kernel[(1,)](buf.half(), 32, BLOCK=16)  # another dtype
    assert not tuning_suspended()
    assert JITFunction.run is recorder  # restored
    assert (stats.launches, stats.compiles, stats.failures) == (11, 6, [])
    me = threading.get_ident()
    assert len(recorder.calls) == 6 and all(warm and tid != me for tid, warm, _, _ in recorder.calls)
    for _, _, args, _ in recorder.calls:  # small stand-ins with the tensor's dtype and 16-byte alignment class
        assert args[0] is not buf and args[0].numel() <= 32
    aligned = {(a[0].dtype, a[0].data_ptr() % 16 == 0) for _, _, a, _ in recorder.calls}
    assert aligned == {(torch.float32, True), (torch.float32, False), (torch.float16, True)}


def test_queued_compiles_keep_no_launch_tensor_alive(monkeypatch):
    """A grid callable closing over the launch's output must not outlive the launch: on the H200 the
    dry pass of a 2048-token prefill kept layer 0's activations (~300 MiB) alive through its queued
    compiles and went out of memory under --vram-budget."""
    gate = threading.Event()

    def slow(fn, *args, grid, warmup, **kwargs):  # a compile still queued while the pass goes on
        gate.wait(5)
        return "kernel"

    monkeypatch.setattr(JITFunction, "run", slow)
    kernel = JITFunction(_body)

    def launch() -> weakref.ref:  # like a launcher: the grid closes over its output
        out = torch.zeros(1 << 16)
        kernel[lambda meta: (out.numel() // meta["BLOCK"],)](out, 64, BLOCK=16)
        return weakref.ref(out)

    with compile_only(workers=1, how="threads"):
        gone = launch()
        kernel[(1,)](torch.zeros(4), 17, BLOCK=16)  # a second one queued behind the first
        assert gone() is None  # freed while its compile is still running
        gate.set()


def test_tensor_descriptors_are_keyed_by_specialisation_and_stood_in_for(monkeypatch):
    """The TMA GEMM passes host tensor descriptors, which hold their base tensor. Keyed by repr, every
    launch printed its tensors' values (a device sync) and, their values differing, was a new compile
    holding its tensors until compiled: on the H200 a 16k-token prompt went out of memory at 6 GB."""
    desc_cls = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    gate = threading.Event()
    got: list[tuple] = []

    def slow(fn, *args, grid, warmup, **kwargs):
        got.append(args)
        gate.wait(5)
        return "kernel"

    monkeypatch.setattr(JITFunction, "run", slow)
    monkeypatch.setattr(torch.Tensor, "__repr__", lambda t: pytest.fail("a launch key printed a tensor"))
    kernel = JITFunction(_body)

    def launch(fill: float) -> weakref.ref:
        out = torch.full((64, 32), fill)
        kernel[(1,)](desc_cls(out, [64, 32], [32, 1], [16, 16]), 64, BLOCK=16)
        return weakref.ref(out)

    with compile_only(workers=1, how="threads") as stats:
        gone = [launch(v) for v in (1.0, 2.0, 3.0)]  # one specialisation, whatever the values
        assert stats.compiles == 1 and all(g() is None for g in gone)
        wide = torch.zeros(64, 64)
        kernel[(1,)](desc_cls(wide, [64, 64], [64, 1], [16, 32]), 64, BLOCK=16)  # another block shape
        assert stats.compiles == 2
        gate.set()
    stand_in = got[0][0]
    assert isinstance(stand_in, desc_cls) and stand_in.base.numel() <= 32 and stand_in.block_shape == [16, 16]
    assert (stand_in.shape, stand_in.strides) == ([64, 32], [32, 1])


def test_other_threads_and_explicit_warmups_pass_through(recorder):
    kernel = JITFunction(_body)
    buf = torch.zeros(8)
    with compile_only(workers=1, how="threads") as stats:
        t = threading.Thread(target=lambda: kernel[(1,)](buf, 8, BLOCK=16))
        t.start()
        t.join()
        assert kernel.run(buf, 8, BLOCK=16, grid=(1,), warmup=True) == "kernel"
    assert stats.launches == 0
    assert [w for _, w, _, _ in recorder.calls] == [False, True]  # launched as asked, not intercepted
    kernel[(1,)](buf, 8, BLOCK=16)  # after the block: a normal launch
    assert recorder.calls[-1][1] is False and recorder.calls[-1][0] == threading.get_ident()


def test_failed_compiles_are_reported_not_raised(monkeypatch):
    monkeypatch.setattr(JITFunction, "run", Recorder(fail=True))
    with compile_only(workers=2, how="threads") as stats:
        JITFunction(_body)[(1,)](torch.zeros(4), 4, BLOCK=16)
    assert stats.compiles == 1 and len(stats.failures) == 1 and "out of resources" in stats.failures[0]


def test_launch_key_separates_what_triton_specialises():
    fn = JITFunction(_body)
    a = torch.zeros(32)
    assert launch_key(fn, (a, 48), {"BLOCK": 16}) == launch_key(fn, (torch.zeros(8), 16), {"BLOCK": 16})
    assert launch_key(fn, (a, 48), {"BLOCK": 16}) != launch_key(fn, (a, 1 << 40), {"BLOCK": 16})  # int64
    assert launch_key(fn, (a, 48), {"BLOCK": 16}) != launch_key(JITFunction(_body), (a, 48), {"BLOCK": 16})


def test_untimed_pick_takes_a_stored_pick_else_the_default(monkeypatch):
    choices = [(1, 2), (3, 4), (5, 6)]
    stored = {("k", '["key"]'): [3, 4]}
    monkeypatch.setattr(tuning_cache, "lookup", lambda dev, kernel, key: stored.get((kernel, tuning_cache._key_str(key))))
    monkeypatch.setattr(tuning_cache, "_UNTIMED", {})  # answers are remembered per process
    dev = torch.device("cpu")
    assert tuning_cache.untimed_pick(dev, "k", ("key",), choices, "default", list) == (3, 4)
    assert tuning_cache.untimed_pick(dev, "k", ("other",), choices, "default", list) == "default"
    stored[("k", '["one"]')] = [3, 4]
    assert tuning_cache.untimed_pick(dev, "k", ("one",), choices[:1], "default", list) == "default"  # nothing to pick
    stored[("k", '["stale"]')] = [9, 9]  # stale: matches no candidate
    assert tuning_cache.untimed_pick(dev, "k", ("stale",), choices, "default", list) == "default"


def test_untimed_picks_are_looked_up_once_per_key(monkeypatch):
    """Untimed calls sit on the per-layer path: the candidates are built and the cache read once a key."""
    lookups, built = [], []
    monkeypatch.setattr(tuning_cache, "lookup", lambda dev, kernel, key: lookups.append(key) or [1, 2])
    monkeypatch.setattr(tuning_cache, "_UNTIMED", {})
    dev = torch.device("cpu")
    cands = lambda: built.append(1) or [(1, 2), (3, 4)]  # noqa: E731
    for _ in range(5):
        assert tuning_cache.untimed_pick(dev, "k", ("a",), cands, "default", list) == (1, 2)
    assert len(lookups) == 1 and len(built) == 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("ahead"), tokenizer_dir=tokenizer_dir)
    return d


def test_dry_weights_hand_out_slot_zero_without_streaming(model_dir):
    probe = make_engine(model_dir)
    low = min_budget(probe.cfg, torch.float32, batch=1, max_context=64, prefill_chunk=4)
    probe.close()
    eng = make_engine(model_dir, vram_budget=low, prefill_chunk=4)
    try:
        w, stream = eng.weights, eng.weights.stream
        streamed = [i for i in range(eng.cfg.num_hidden_layers) if i not in w.resident]
        assert streamed, "the budget must stream layers"
        before = (stream.consumed, stream.streamed_bytes)
        w.dry = True
        views = w.layer(streamed[-1])
        assert all(v.data_ptr() == s.data_ptr() for v, s in zip(views.values(), w.slot_layer(0, streamed[-1]).values()))
        w.release(streamed[-1])
        list(w.lm_head_parts())
        w.dry = False
        assert (stream.consumed, stream.streamed_bytes) == before  # nothing acquired, nothing crossed
        prompts = random_prompts([9], eng.cfg.vocab_size, seed=3)
        got = generate(eng, prompts, SamplingParams(temperature=0.0), max_new_tokens=6).token_ids
    finally:
        eng.close()
    ref_eng = make_engine(model_dir)
    try:
        ref = generate(ref_eng, prompts, SamplingParams(temperature=0.0), max_new_tokens=6).token_ids
    finally:
        ref_eng.close()
    assert got == ref


def test_not_wanted_on_the_cpu(model_dir):
    eng = make_engine(model_dir)
    try:
        assert not engine_ahead.wanted(eng.model)  # the CPU: nothing to compile
    finally:
        eng.close()


def test_the_dry_decode_takes_greedy_sampling_along(model_dir, monkeypatch):
    """The dry decode pass also meets the argmax kernels (a first run compiled them at its first token),
    on the logits' first vocab_size columns as the sampler slices them."""
    import contextlib

    import kernels.sampling

    seen = []
    monkeypatch.setattr(engine_ahead, "wanted", lambda model: True)
    monkeypatch.setattr(engine_ahead, "dry", lambda model: contextlib.nullcontext())  # a real pass, on the CPU
    monkeypatch.setattr(kernels.sampling, "argmax", lambda logits: seen.append(tuple(logits.shape)))
    eng = make_engine(model_dir)  # the engine's start runs the dry decode once
    eng.close()
    assert seen == [(1, eng.cfg.vocab_size)]


def test_the_first_prompts_prefill_compiles_at_load(model_dir, monkeypatch):
    """With ``first_prompts`` the dry decode pass runs their prefill too (one pool, one wait), so the first
    generate finds its shape compiled and runs no dry pass of its own; the tokens are unchanged."""
    import contextlib

    prompts = random_prompts([9, 5], 100, seed=7)
    ref = make_engine(model_dir, batch=2)
    try:
        want = generate(ref, prompts, SamplingParams(temperature=0.0), max_new_tokens=5).token_ids
    finally:
        ref.close()
    prefilled, later = [], []
    monkeypatch.setattr(engine_ahead, "wanted", lambda model: True)
    monkeypatch.setattr(engine_ahead, "dry", lambda model: contextlib.nullcontext())  # a real pass, on the CPU
    monkeypatch.setattr(engine_ahead, "prefill", lambda *a, **k: later.append(1))
    eng = make_engine(model_dir, batch=2, first_prompts=(9, 5))
    try:
        prefill = eng.model.prefill
        eng.model.prefill = lambda ids, lens, *a: prefilled.append((tuple(ids.shape), lens)) or prefill(ids, lens, *a)
        chunk = eng.opts.prefill_chunk // 2
        assert eng.prefill_shapes == {(chunk, 9, 5)}
        got = generate(eng, prompts, SamplingParams(temperature=0.0), max_new_tokens=5).token_ids
    finally:
        eng.close()
    assert later == [] and prefilled == [((2, 9), [9, 5])]  # the generate's real prefill only
    assert got == want


@pytest.mark.cuda
def test_gpu_dry_passes_compile_and_keep_the_tokens(model_dir, monkeypatch):
    """On a GPU: the dry decode and prefill passes compile (in processes, or threads), and the tokens
    equal a run without them."""
    monkeypatch.setattr(tuning_cache, "has_entries", lambda device: True)
    prompts = random_prompts([37, 5], 100, seed=4)
    runs = {}
    for mode in ("0", "processes", "threads"):
        monkeypatch.setenv("LAYERSTREAM_COMPILE_AHEAD", mode)
        eng = make_engine(model_dir, device="cuda", kernels="triton", batch=2, prefill_chunk=16)
        try:
            assert engine_ahead.wanted(eng.model) == (mode != "0")
            runs[mode] = generate(eng, prompts, SamplingParams(temperature=0.0), max_new_tokens=8).token_ids
            assert eng.prefill_shapes == {(8, 37, 5)}
        finally:
            eng.close()
    assert runs["0"] == runs["processes"] == runs["threads"]


@pytest.mark.parametrize("how,cold,want", [("processes", True, True), ("processes", False, False),
                                           ("threads", True, False), ("0", True, False)])
def test_prestart_only_for_processes_on_a_cold_cache(monkeypatch, how, cold, want):
    """The engine starts the worker processes before loading weights only when its dry passes will use
    them (processes, CUDA with the Triton kernels, tuning picks) and Triton's cache is cold."""
    started = []
    monkeypatch.setenv("LAYERSTREAM_COMPILE_AHEAD", how)
    monkeypatch.setattr(tuning_cache, "has_entries", lambda device: True)
    monkeypatch.setattr(engine_ahead, "cache_looks_cold", lambda: cold)
    monkeypatch.setattr(engine_ahead, "start_pool", lambda: started.append(1) or "pool")
    monkeypatch.setattr(engine_ahead, "warm_key_in_background", lambda: None)
    cuda = torch.device("cuda")
    assert engine_ahead.prestart(cuda, "triton") is want and len(started) == want
    assert not engine_ahead.prestart(cuda, "torch")
    assert not engine_ahead.prestart(torch.device("cpu"), "triton")
    assert len(started) == want
