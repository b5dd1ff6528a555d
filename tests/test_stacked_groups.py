"""Prompt groups stacked through each layer's projections (``Model.layer_stacked``, ``stacked_runs``): the same
logits as group by group, on the plain, the q/k-norm and a packed (AWQ) tiny model, CPU fp32 torch kernels."""

from __future__ import annotations

import contextlib

import pytest
import torch

import engine.model
from engine.model import Group, Model, stacked_runs
from tests.helpers import make_engine, random_prompts


def _group(n_rows: int, t: int, start: int = 0, row0: int = 0) -> Group:
    ids = torch.zeros((n_rows, t), dtype=torch.long)
    return Group(ids, torch.full((n_rows,), start, dtype=torch.int32), torch.full((n_rows,), t, dtype=torch.int32),
                 row0, start + t)


@pytest.mark.parametrize("shapes,limit,runs", [
    ([(2, 1), (1, 5), (1, 3), (1, 8)], 8, [[0], [1, 2], [3]]),  # the decode group alone; 5 + 3 fit, 8 alone
    ([(1, 5), (1, 3), (1, 8)], 16, [[0, 1, 2]]),
    ([(1, 5), (2, 1), (1, 3)], 16, [[0], [1], [2]]),  # a decode group between prompts splits the run
    ([(1, 9), (1, 2)], 8, [[0], [1]]),  # a group over the limit stays alone (the plan ran it alone anyway)
    ([(2, 3), (1, 2)], 8, [[0, 1]]),  # rows x tokens, padding included
    ([(1, 5), (1, 3)], 0, [[0], [1]]),  # 0: off
    ([], 8, []),
])
def test_stacked_runs_keep_order_and_the_limit(shapes, limit, runs):
    groups = [_group(b, t) for b, t in shapes]
    assert stacked_runs(groups, limit) == runs


@pytest.mark.parametrize("shapes,free,limit,runs", [
    # the decode group heads the first unit; the free prompts first fit by decreasing rows
    ([(2, 1), (1, 5), (1, 3), (1, 8)], {1, 2, 3}, 8, [[0, 1], [3], [2]]),
    # the burst of session 27 at its 2048-row limit: five units in order, four packed
    ([(1, n) for n in (132, 306, 567, 639, 681, 913, 947, 1117, 1345)], set(range(9)), 2048,
     [[4, 8], [5, 7], [0, 1, 3, 6], [2]]),
    # a long prompt's slices (1, 2: one sequence) keep their order, after the decode group's unit
    ([(3, 1), (1, 8), (1, 2), (1, 4), (1, 1)], {3, 4}, 8, [[0, 3, 4], [1], [2]]),
    ([(1, 5), (1, 3)], {0, 1}, 8, [[0, 1]]),  # no decode group: the free prompts alone packed
    ([(9, 1), (1, 3)], {1}, 8, [[0], [1]]),  # a decode group over the limit stays alone, first
    ([(2, 1), (1, 9), (1, 3)], {1, 2}, 8, [[0, 2], [1]]),  # a free group over the limit runs alone
    ([(2, 1), (1, 5)], set(), 8, [[0], [1]]),  # nothing free: in order
    ([(2, 1), (1, 5)], {1}, 0, [[0], [1]]),  # 0: off
])
def test_stacked_runs_packed(shapes, free, limit, runs):
    groups = [_group(b, t) for b, t in shapes]
    got = stacked_runs(groups, limit, free)
    assert got == runs
    assert sorted(k for run in got for k in run) == list(range(len(groups)))  # every group once
    assert all(sum(groups[k].ids.numel() for k in run) <= limit for run in got if len(run) > 1)


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-qwen3", "tiny-qwen2-awq"])
def model_dir(request, tmp_path_factory):
    from engine.synth.writer import synthesize
    preset, _, quant = request.param.partition("-awq")
    return synthesize(preset, tmp_path_factory.mktemp("stack") / request.param, dtype="bf16", seed=3,
                      quant="awq" if request.param.endswith("-awq") else None)


# stack_free None: one run of the three prompt groups (4 + 3 + 5 rows), the decode group alone; {3}: the decode
# group and the free prompt (2 + 5 rows), then the long prompt's two slices (4 + 3 rows)
PACKINGS = {None: ([3], [2, 12, 4, 3, 5]), 3: ([2, 2], [7, 2, 5, 7, 4, 3])}


@pytest.mark.parametrize("free", [None, 3])
@pytest.mark.parametrize("states", ["device", "host", "parked"])
def test_stacked_pass_gives_the_logits_of_group_by_group(model_dir, monkeypatch, states, free):
    """Two prompts (two slices of one, the later reading the earlier's keys) and a decode group in one pass:
    stacked (in order: one run of prompt slices, its states one [1, 12] unit; packed: the decode group with the
    free prompt, then the slices; their states on the device, in host memory, parked in the cache's unreached
    positions) and group by group give the same logits and the same KV cache."""
    eng = make_engine(model_dir, batch=4, max_context=64)
    calls = []
    real = Model.layer_stacked
    monkeypatch.setattr(Model, "layer_stacked", lambda self, w, h, res, groups, *a: calls.append(len(groups)) or
                        real(self, w, h, res, groups, *a))
    try:
        prompts = random_prompts([7, 5, 4], eng.cfg.vocab_size, seed=9)
        groups = [Group(torch.tensor([[11], [12]]), torch.tensor([20, 30], dtype=torch.int32),
                        torch.ones(2, dtype=torch.int32), 0, 31)]  # rows 0-1 decode at positions 20 and 30
        spans = [(2, prompts[0][:4], 0), (2, prompts[0][4:], 4), (3, prompts[1], 0)]
        for row, ids, start in spans:
            groups.append(Group(torch.tensor([ids]), torch.tensor([start], dtype=torch.int32),
                                torch.tensor([len(ids)], dtype=torch.int32), row, start + len(ids)))
        pick = [(0, 0, 0), (0, 1, 0), (2, 0, 2), (3, 0, 4)]
        gen = torch.Generator().manual_seed(1)
        for k_cache, v_cache in (eng.cache.layer(i) for i in range(eng.cfg.num_hidden_layers)):
            k_cache.copy_(torch.randn(k_cache.shape, generator=gen))  # the decode rows' earlier keys
            v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
        before = [tuple(c.clone() for c in eng.cache.layer(i)) for i in range(eng.cfg.num_hidden_layers)]
        monkeypatch.setattr("engine.state_parking.MIN_SPAN_ELEMENTS", 1)  # the tiny model's tails are short
        kw = dict(host_states=states != "device", park=states == "parked")
        alone = eng.model.forward_groups(groups, eng.cache, pick, stack_rows=0, **kw)
        kv_alone = [tuple(c.clone() for c in eng.cache.layer(i)) for i in range(eng.cfg.num_hidden_layers)]
        for i, (k_cache, v_cache) in enumerate(eng.cache.layer(j) for j in range(eng.cfg.num_hidden_layers)):
            k_cache.copy_(before[i][0])
            v_cache.copy_(before[i][1])
        assert not calls
        parked = eng.model.parked_passes
        entered = []  # the chunk contexts entered, by rows: the stack's, then each stacked group's attention
        chunk_context = lambda rows: entered.append(rows) or contextlib.nullcontext()  # noqa: E731
        stacked = eng.model.forward_groups(groups, eng.cache, pick, chunk_context, stack_rows=16,
                                           stack_free=None if free is None else {free}, **kw)
        assert eng.model.parked_passes - parked == (states == "parked")
        units, contexts = PACKINGS[free]
        assert calls == units * eng.cfg.num_hidden_layers
        # a short group's rope and attention run under its own rows' context (ops.prompt_chunk: untuned, as alone)
        assert entered == contexts * eng.cfg.num_hidden_layers
        torch.testing.assert_close(stacked, alone, rtol=1e-5, atol=1e-5)
        ends = [21, 31, 7, 5]  # each row's positions written or read (parked states wait past them)
        for i in range(eng.cfg.num_hidden_layers):
            for r, end in enumerate(ends):
                for got, want in zip(eng.cache.layer(i), kv_alone[i]):
                    torch.testing.assert_close(got[r, :, :end], want[r, :, :end], rtol=1e-5, atol=1e-5)
    finally:
        eng.close()


def test_pass_scope_sums_start_and_lengths_once_per_pass():
    """Inside ``pass_scope`` every layer's ``seq_lens`` of the same inputs is one tensor (one launch a pass, not one
    a layer); outside it, or after it, a fresh sum each call; another pair of inputs gets its own."""
    from engine.ops import TorchOps
    ops = TorchOps()
    start, lens = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32)
    assert ops.seq_lens(start, lens) is not ops.seq_lens(start, lens)
    with ops.pass_scope():
        first = ops.seq_lens(start, lens)
        assert first.tolist() == [4, 1] and ops.seq_lens(start, lens) is first
        with ops.pass_scope():  # a nested scope (a captured piece inside a pass) shares the outer one's
            assert ops.seq_lens(start, lens) is first
        other = torch.tensor([5, 5], dtype=torch.int32)
        assert ops.seq_lens(other, lens).tolist() == [6, 6]
    assert ops._lens is None and ops.seq_lens(start, lens) is not first


def test_run_pick_maps_tokens_into_stacked_units():
    from engine.model import run_pick
    groups = [_group(2, 1), _group(2, 3), _group(1, 4)]
    runs = stacked_runs(groups, 16)
    assert runs == [[0], [1, 2]]
    assert run_pick(groups, runs, [(0, 1, 0), (1, 1, 2), (2, 0, 3), (1, 0, 0)]) == [(0, 1, 0), (1, 0, 5), (1, 0, 9),
                                                                                (1, 0, 0)]


@pytest.mark.parametrize("stack_rows", [0, 16])
def test_at_the_swiglu_only_gate_up_and_the_residual_are_alive(model_dir, stack_rows):
    """A prefill chunk's peak is the SwiGLU (gate_up and its output): the layer's qkv, attention output, o, the
    normed inputs and the old residual must be dead by then (held, they had run a served pass out of memory at
    6 GiB: session 30). Every tensor the ops returned in the layer is tracked by weak reference."""
    import weakref
    eng = make_engine(model_dir, batch=4, max_context=64)
    ops, tracked, checked = eng.model.ops, [], []

    def tracking(name):
        real = getattr(ops, name)

        def call(*a, **k):
            out = real(*a, **k)
            tracked.extend(weakref.ref(t) for t in (out if isinstance(out, tuple) else (out,))
                           if isinstance(t, torch.Tensor))
            return out
        return call

    names = ["linear", "add_rmsnorm_linear", "add_rmsnorm", "rmsnorm", "attention", "swiglu"]
    patched = {n: tracking(n) for n in names}
    real_swiglu_linear = ops.swiglu_linear

    def swiglu_linear(gate_up, w):
        latest = [r() for r in tracked[-2:]]  # the last add_rmsnorm_linear's (gate_up, new residual)
        alive = [t for t in (r() for r in tracked) if t is not None and not any(t is x for x in latest)]
        checked.append(len(alive))
        out = real_swiglu_linear(gate_up, w)
        tracked.clear()  # the layer's output is the next layer's input: alive, rightly
        return out

    try:
        for n, fn in patched.items():
            setattr(ops, n, fn)
        ops.swiglu_linear = swiglu_linear
        prompts = random_prompts([7, 5], eng.cfg.vocab_size, seed=4)
        groups = [Group(torch.tensor([ids]), torch.zeros(1, dtype=torch.int32), torch.tensor([len(ids)],
                                                                                         dtype=torch.int32), r, len(ids))
                  for r, ids in enumerate(prompts)]
        eng.model.forward_groups(groups, eng.cache, [(0, 0, 6), (1, 0, 4)], stack_rows=stack_rows)
    finally:
        for n in [*names, "swiglu_linear"]:
            ops.__dict__.pop(n, None)
        eng.close()
    units = 1 if stack_rows else 2
    assert checked == [0] * (units * eng.cfg.num_hidden_layers)


@pytest.mark.parametrize("park", [False, True], ids=["host", "parked"])
def test_a_pass_of_one_unit_keeps_its_states_on_the_device(model_dir, monkeypatch, park):
    """Decode rows and a prompt packed into one unit (``LAYERSTREAM_STACK_PROMPTS=packed``'s packing): with
    host states asked for, none are built (one unit never waits for another between layers;
    its host states waited for their own copies out, a host sync a layer where they could not park), nothing
    crosses to the host, and the logits are those of device states."""
    eng = make_engine(model_dir, batch=4, max_context=64)
    built = []
    real = engine.model.HostStates
    monkeypatch.setattr(engine.model, "HostStates", lambda *a, **kw: built.append(1) or real(*a, **kw))
    try:
        prompt = random_prompts([9], eng.cfg.vocab_size, seed=4)[0]
        groups = [Group(torch.tensor([[11], [12]]), torch.tensor([20, 30], dtype=torch.int32),
                        torch.ones(2, dtype=torch.int32), 0, 31),
                  Group(torch.tensor([prompt]), torch.tensor([0], dtype=torch.int32),
                        torch.tensor([9], dtype=torch.int32), 2, 9)]
        pick = [(0, 0, 0), (0, 1, 0), (1, 0, 8)]
        gen = torch.Generator().manual_seed(2)
        for k_cache, v_cache in (eng.cache.layer(i) for i in range(eng.cfg.num_hidden_layers)):
            k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
            v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
        before = [tuple(c.clone() for c in eng.cache.layer(i)) for i in range(eng.cfg.num_hidden_layers)]
        kw = dict(stack_rows=16, stack_free={1})
        want = eng.model.forward_groups(groups, eng.cache, pick, **kw)
        for i, (k_cache, v_cache) in enumerate(eng.cache.layer(j) for j in range(eng.cfg.num_hidden_layers)):
            k_cache.copy_(before[i][0])
            v_cache.copy_(before[i][1])
        moved, parked = eng.model.state_host_bytes, eng.model.parked_passes
        got = eng.model.forward_groups(groups, eng.cache, pick, host_states=True, park=park, **kw)
        assert not built and eng.model.state_host_bytes == moved and eng.model.parked_passes == parked
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        eng.close()
