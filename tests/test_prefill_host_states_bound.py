"""The device side of a host-states prefill holds what the planner counts, however far the copies lag.

With ``--prefill-states host`` the planner counts two chunks' states on the device besides the computing
chunk (whose input and output are part of its activations): one being copied in, one being copied out
(``memory.footprint.Footprint.prefill_state_bytes``). On the CPU this walks every live tensor (``gc``)
after each layer call of a real prefill and sums the storages made since the states object was built,
host buffers aside, so whatever keeps a chunk's states alive counts: the states object, a queued copy,
a loop variable. :class:`LaggingLane` is a copy stream the host runs ahead of without bound (a copy runs
only once something waits for it): device memory held by a pending copy stays held, and a compute that
did not wait for its upload would read stale states. The GPU test runs a 16k-token prompt under an
allocator cap set to the plan.
"""

from __future__ import annotations

import gc
from collections import deque
from pathlib import Path

import pytest
import torch

import engine.model
from engine.footprint import min_budget
from engine.generate import generate, prefill
from engine.prefill_states import HostStates
from memory.footprint import HOST_STATE_RING
from engine.sampling import SamplingParams
from tests.helpers import make_engine, make_hf_model, random_prompts

CHUNK = 8  # prefill tokens per group: 8 rows x 1, 4 x 2 or 2 x 4 tokens
LENGTHS = {"batch1": [40], "batch2": [17, 24], "batch4": [5, 9, 17, 24]}  # groups of full chunks only


class LaggingLane:
    """A copy stream that runs a queued copy only when the host or the compute waits for it (FIFO)."""

    def __init__(self) -> None:
        self.queue: deque[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = deque()
        self.count = self.max_pending = 0

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], out: bool = False, after: int | None = None) -> int:
        assert after is None or after <= self.count  # FIFO: what it waits for is already queued
        self.count += 1
        self.queue.append((self.count, pairs))
        self.max_pending = max(self.max_pending, len(self.queue))
        return self.count

    def compute_waits(self, done: int) -> None:
        while self.queue and self.queue[0][0] <= done:
            for dst, src in self.queue.popleft()[1]:
                dst.copy_(src)

    host_waits = compute_waits

    def drain(self) -> None:
        self.compute_waits(self.count)


class StateMeter:
    """The largest sum of bytes of tensor storages alive at once that are not in ``base`` (what lived
    when the states object was built) nor host buffers of the states object, over ``min_bytes`` (a
    picked token's row is smaller than any chunk)."""

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes, self.peak, self.states = min_bytes, 0, None
        self.base: dict[int, torch.UntypedStorage] = {}  # kept alive: their addresses are not reused

    def start(self, states) -> None:
        self.states, self.base = states, self._live()

    def sample(self) -> None:
        host = {t.untyped_storage().data_ptr() for pair in self.states.host if pair is not None for t in pair}
        now = [s.nbytes() for p, s in self._live().items()
               if p not in self.base and p not in host and s.nbytes() > self.min_bytes]
        self.peak = max(self.peak, sum(now))

    @staticmethod
    def _live() -> dict[int, torch.UntypedStorage]:
        out = {}
        for o in gc.get_objects():
            if issubclass(type(o), torch.Tensor) and o.device.type == "cpu" and not o.is_sparse:
                s = o.untyped_storage()
                if s.nbytes():
                    out[s.data_ptr()] = s
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("host_bound"), tokenizer_dir=tokenizer_dir)
    return d


def _metered(monkeypatch, eng, lane: LaggingLane | None) -> StateMeter:
    """Meter ``eng``'s next host-states prefill: the baseline when its states object is built, a sample
    after every layer call past layer 0 (layer 0 holds no uploads)."""
    h = eng.cfg.hidden_size
    meter = StateMeter(min_bytes=h * 4)

    def states(*args, **kw):
        st = HostStates(*args, **kw) if lane is None else HostStates(*args, lane=lane, **kw)
        meter.start(st)
        return st

    real = eng.model.layer

    def layer(*args, **kw):
        out = real(*args, **kw)
        st = meter.states
        if st is not None and st.n <= st.step < st.layers * st.n:  # a prefill's layer past the first
            meter.sample()  # the layer's input and output are alive here, with everything held beside them
        return out

    monkeypatch.setattr(engine.model, "HostStates", states)
    monkeypatch.setattr(eng.model, "layer", layer)
    return meter


@pytest.mark.parametrize("lagging", [False, True], ids=["immediate", "lagging"])
@pytest.mark.parametrize("batch", list(LENGTHS))
def test_device_states_are_the_planned_four_chunks(model_dir, monkeypatch, batch, lagging):
    lengths = LENGTHS[batch]
    b = len(lengths)
    host = make_engine(model_dir, batch=b, prefill_chunk=CHUNK, prefill_states="host")
    vram = make_engine(model_dir, batch=b, prefill_chunk=CHUNK, prefill_states="vram")
    assert host.plan.prefill_state_place == "host"
    per_token = 2 * host.cfg.hidden_size * 4  # hidden + residual, fp32
    chunk_states = CHUNK * per_token  # one group of CHUNK tokens (every group is full here)
    ahead = HOST_STATE_RING - 1  # chunks the host runs ahead of the copies
    assert host.plan.prefill_state_bytes == 2 * ahead * chunk_states  # the planner: copied in, copied out
    prompts = random_prompts(lengths, host.cfg.vocab_size, seed=3 + b)
    want = prefill(vram, prompts)
    lane = LaggingLane() if lagging else None
    meter = _metered(monkeypatch, host, lane)
    got = prefill(host, prompts)
    assert torch.equal(got, want)  # no compute read a staging buffer before its copy in
    # besides the computing group's input and output (its activations): the plan's two groups, no more
    assert meter.peak == 2 * chunk_states + host.plan.prefill_state_bytes, (meter.peak / chunk_states)
    if lagging:
        assert lane.max_pending == ahead + 2  # the ring's copies out and one copy in, no more
        assert not lane.queue  # all copies done when the prefill returns
    for eng in (host, vram):
        eng.close()


@pytest.mark.parametrize("lagging", [False, True], ids=["immediate", "lagging"])
def test_one_unit_keeps_its_states_on_the_device(model_dir, monkeypatch, lagging):
    # a pass of one unit never waits between layers for another: no host states (they would wait for their own
    # copies out, a host sync a layer where they cannot park), nothing crosses to the host
    host = make_engine(model_dir, prefill_chunk=CHUNK, prefill_states="host")
    vram = make_engine(model_dir, prefill_chunk=CHUNK, prefill_states="vram")
    assert host.plan.prefill_state_place == "host"
    prompts = random_prompts([CHUNK], host.cfg.vocab_size, seed=1)
    want = generate(vram, prompts, SamplingParams(), max_new_tokens=3).token_ids
    lane = LaggingLane() if lagging else None
    meter = _metered(monkeypatch, host, lane)
    moved = host.model.state_host_bytes
    assert generate(host, prompts, SamplingParams(), max_new_tokens=3).token_ids == want
    assert meter.states is None and host.model.state_host_bytes == moved
    for eng in (host, vram):
        eng.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_long_prompt_stays_within_the_plan_under_the_cap(tmp_path, monkeypatch):
    """A 16k-token prompt in 8 chunks of a 4-layer Qwen2.5-7B shape, host states, the allocator capped at
    the plan's bytes (the CUDA context left out of the budget): it runs, and the prefill's peak over
    what was allocated before it stays within the planned workspace."""
    from engine.synth.writer import synthesize
    from memory.process_vram import Outside
    monkeypatch.setattr("engine.engine.outside_allocator", lambda dev: Outside(0, "left out by the test"))
    model = synthesize("qwen2.5-7b", tmp_path / "q7b", layers=4, device="cuda")
    chunk, context = 2048, 16384 + 64
    gpu = dict(device="cuda", dtype="bf16", kernels="triton", max_context=context, prefill_chunk=chunk,
               prefill_states="host", host_budget=4 << 30)
    probe = make_engine(model, **gpu)
    low = min_budget(probe.cfg, torch.bfloat16, max_context=context, prefill_chunk=chunk, host_states=True)
    probe.close()
    eng = make_engine(model, vram_budget=low, cap_allocator=True, **gpu)
    assert eng.plan.prefill_state_place == "host" and eng.plan.streamed_layers
    vocab = eng.cfg.vocab_size
    prefill(eng, random_prompts([8 * chunk], vocab, seed=1))  # the same shapes first: tuning, compiles, pools
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logits = prefill(eng, random_prompts([8 * chunk], vocab, seed=2))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert torch.isfinite(logits).all()
    assert peak <= eng.plan.allocator_bytes
    assert peak - before <= eng.plan.workspace_bytes, (peak - before, eng.plan.workspace_bytes)
    eng.close()
