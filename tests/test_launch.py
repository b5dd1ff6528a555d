"""kernels.launch: the cached Triton launch keys calls by what Triton specialises on and hands later
calls of a key straight to the kept kernel (CPU: a stand-in JIT function; the GPU test runs the engine's
kernels with Triton's own pick checked on every call)."""

from __future__ import annotations

import pytest
import torch

import kernels.launch as launch


class FakeKernel:
    """A compiled kernel's entry points, recording the launches handed to it."""

    function, packed_metadata = "fn", "meta"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *a):
        self.calls.append(a)


class FakeJIT:
    """``fn[grid](*args, **meta)`` as Triton's JIT function: compiles one kernel per call it sees."""

    arg_names = ["x", "n", "scale", "BLOCK"]

    def __init__(self, entry_points: bool = True) -> None:
        self.slow: list[tuple] = []
        self.entry_points = entry_points

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.slow.append((grid, args, meta))
            return FakeKernel() if self.entry_points else object()
        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.delenv("LAYERSTREAM_FAST_LAUNCH", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 1234, raising=False)
    monkeypatch.setattr(launch, "_hooks", lambda: False)


def test_later_calls_of_a_key_skip_triton(fast):
    fn = FakeJIT()
    run = launch.Launcher(fn)
    x = torch.zeros(64)
    run((4,), x, 32, 0.5, BLOCK=16, num_warps=4)
    assert len(fn.slow) == 1
    kernel = run.kernels[next(iter(run.kernels))]
    run((8, 2), x[4:], 48, 0.25, BLOCK=16, num_warps=4)  # the same key: aligned, n % 16 == 0, a float
    assert len(fn.slow) == 1 and len(kernel.calls) == 1 and (run.triton, run.cached) == (1, 1)
    grid_x, grid_y, grid_z, stream, function, meta, lmeta, enter, leave, *values = kernel.calls[0]
    assert (grid_x, grid_y, grid_z, stream, function, meta) == (8, 2, 1, 1234, "fn", "meta")
    assert (lmeta, enter, leave) == (None, None, None)
    assert values[0].data_ptr() == x[4:].data_ptr() and values[1:] == [48, 0.25, 16]  # signature order


@pytest.mark.parametrize("change", ["misaligned", "n not a multiple of 16", "n == 1", "n over 32 bits",
                                    "dtype", "constexpr", "num_warps"])
def test_a_call_triton_would_specialise_differently_goes_through_triton(fast, change):
    fn = FakeJIT()
    run = launch.Launcher(fn)
    x = torch.zeros(64)
    args, meta = [x, 32, 0.5], dict(BLOCK=16, num_warps=4)
    run((1,), *args, **meta)
    if change == "misaligned":
        args[0] = x[1:]  # 4 bytes off a 16-byte boundary
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        meta["BLOCK"] = 32
    elif change == "num_warps":
        meta["num_warps"] = 8
    else:
        args[1] = {"n not a multiple of 16": 40, "n == 1": 1, "n over 32 bits": 1 << 36}[change]
    run((1,), *args, **meta)
    assert len(fn.slow) == 2 and len(run.kernels) == 2


def test_falls_back_to_triton_where_it_cannot_key_or_launch(fast, monkeypatch):
    x = torch.zeros(16)
    fn = FakeJIT()
    run = launch.Launcher(fn)
    run((1,), x, 16, 0.5, BLOCK=[16], num_warps=4)  # an unhashable keyword
    run((1,), x, 16, 0.5, BLOCK=[16], num_warps=4)
    assert len(fn.slow) == 2 and not run.kernels
    run((1,), x, 16, 0.5)  # BLOCK left to a default: not every parameter named, nothing kept
    assert not run.kernels
    bare = FakeJIT(entry_points=False)  # a Triton whose compiled kernels lack run / function / packed_metadata
    run = launch.Launcher(bare)
    run((1,), x, 16, 0.5, BLOCK=16)
    run((1,), x, 16, 0.5, BLOCK=16)
    assert len(bare.slow) == 2 and not run.usable
    fn = FakeJIT()
    run = launch.Launcher(fn)
    monkeypatch.setattr(launch, "_hooks", lambda: True)  # a profiler's launch hooks: Triton's path
    run((1,), x, 16, 0.5, BLOCK=16)
    run((1,), x, 16, 0.5, BLOCK=16)
    assert len(fn.slow) == 2


@pytest.mark.parametrize("why", ["interpreter", "env"])
def test_off_means_every_call_through_triton(fast, monkeypatch, why):
    if why == "interpreter":
        monkeypatch.setattr(launch, "_INTERPRET", True)
    else:
        monkeypatch.setenv("LAYERSTREAM_FAST_LAUNCH", "0")
    fn = FakeJIT()
    run = launch.Launcher(fn)
    for _ in range(3):
        run((1,), torch.zeros(16), 16, 0.5, BLOCK=16)
    assert len(fn.slow) == 3 and not run.kernels


def test_descriptor_keys_cover_block_and_strides():
    td = pytest.importorskip("triton.tools.tensor_descriptor")
    t = torch.zeros(64, 64)
    a = td.TensorDescriptor(t, [64, 64], [64, 1], [16, 16])
    assert launch.spec(a) == launch.spec(td.TensorDescriptor(t[16:], [48, 64], [64, 1], [16, 16]))
    assert launch.spec(a) != launch.spec(td.TensorDescriptor(t, [64, 64], [64, 1], [32, 16]))
    assert launch.spec(a) != launch.spec(td.TensorDescriptor(t, [40, 64], [64, 1], [16, 16]))
    with pytest.raises(TypeError):
        launch.spec(object())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_prefill_and_decode_with_cached_launches(tmp_path, tokenizer_dir, monkeypatch):
    """The engine's Triton kernels on the GPU (mixed prompt lengths: several chunk shapes, odd tails,
    offsets) with every cached launch checked against Triton's own pick; logits and tokens equal
    those of Triton's launch path."""
    from engine.generate import generate, prefill
    from engine.sampling import SamplingParams
    from tests.helpers import make_engine, make_hf_model, random_prompts

    _, d = make_hf_model("qwen2", tmp_path, tokenizer_dir=tokenizer_dir)
    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LAYERSTREAM_FAST_LAUNCH", mode)
        monkeypatch.setenv("LAYERSTREAM_FAST_LAUNCH_CHECK", mode)
        before = launch.counts()
        eng = make_engine(d, device="cuda", dtype="bf16", kernels="triton", batch=3, prefill_chunk=16,
                          max_context=128)
        prompts = random_prompts([5, 37, 70], eng.cfg.vocab_size, seed=5)
        logits = prefill(eng, prompts)
        tokens = generate(eng, prompts, SamplingParams(), max_new_tokens=5).token_ids
        runs[mode] = logits.float().cpu(), tokens
        eng.close()
        after = launch.counts()
        assert (after["cached"] > before["cached"]) == (mode == "1"), (before, after)
    assert torch.equal(runs["0"][0], runs["1"][0]) and runs["0"][1] == runs["1"][1]
