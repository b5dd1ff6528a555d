"""A stacked unit's prompt slices in one RoPE + append launch and one attention launch a layer (engine/varlen.py):
the Triton kernels (interpreter) give the logits and KV cache of the same pass run group by group, on the plain,
the q/k-norm and a packed (AWQ) tiny model; the plan covers only trailing prompt slices on the shared cache."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV  # (sets TRITON_INTERPRET first)

from engine.model import Group  # noqa: E402
from engine.varlen import plan_unit  # noqa: E402
from tests.helpers import make_engine, random_prompts  # noqa: E402


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-qwen3", "tiny-qwen2-awq"])
def model_dir(request, tmp_path_factory):
    from engine.synth.writer import synthesize
    preset, _, _ = request.param.partition("-awq")
    return synthesize(preset, tmp_path_factory.mktemp("varlen") / request.param, dtype="bf16", seed=3,
                      quant="awq" if request.param.endswith("-awq") else None)


def _groups(vocab: int) -> list[Group]:
    """A decode group (rows 0-1), a prompt's two slices (row 2, the later reading the earlier's keys), a
    two-row prompt group with right padding (rows 4-5), and a prompt (row 3)."""
    p = random_prompts([7, 5, 6, 3], vocab, seed=9)
    i32 = dict(dtype=torch.int32, device=DEV)
    groups = [Group(torch.tensor([[11], [12]], device=DEV), torch.tensor([20, 30], **i32),
                    torch.ones(2, **i32), 0, 31)]
    for row, ids, start in [(2, p[0][:4], 0), (2, p[0][4:], 4), (3, p[1], 0)]:
        groups.append(Group(torch.tensor([ids], device=DEV), torch.tensor([start], **i32),
                            torch.tensor([len(ids)], **i32), row, start + len(ids)))
    groups.append(Group(torch.tensor([p[2], p[3] + [0] * 3], device=DEV), torch.tensor([2, 2], **i32),
                        torch.tensor([6, 3], **i32), 4, 8))  # after 2 cached positions each
    return groups


@pytest.mark.parametrize("states", ["device", "host", "parked"])
def test_stacked_slices_in_one_launch_give_the_logits_of_group_by_group(model_dir, monkeypatch, states):
    """Their states between layers on the device, in host memory, or parked in the cache's unreached positions."""
    if states != "device" and not model_dir.name == "tiny-qwen2":
        pytest.skip("the states' places are the plain model's (the layers' maths are the same)")
    monkeypatch.setattr("engine.state_parking.MIN_SPAN_ELEMENTS", 1)  # the tiny model's tails are short
    kw = dict(host_states=states != "device", park=states == "parked")
    eng = make_engine(model_dir, kernels="triton", device=DEV, batch=6, max_context=64)
    try:
        groups = _groups(eng.cfg.vocab_size)
        pick = [(0, 0, 0), (0, 1, 0), (2, 0, 2), (3, 0, 4), (4, 0, 5), (4, 1, 2)]
        gen = torch.Generator().manual_seed(1)
        for k_cache, v_cache in (eng.cache.layer(i) for i in range(eng.cfg.num_hidden_layers)):
            k_cache.copy_(torch.randn(k_cache.shape, generator=gen))  # the decode rows' earlier keys
            v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
        before = [tuple(c.clone() for c in eng.cache.layer(i)) for i in range(eng.cfg.num_hidden_layers)]
        launches = []
        real = eng.ops.attention_varlen
        monkeypatch.setattr(eng.ops, "attention_varlen", lambda *a: launches.append(a[5].shape[1]) or real(*a))
        runs = []
        for on in (False, True):
            monkeypatch.setattr("engine.model.varlen_enabled", lambda on=on: on)
            for i in range(eng.cfg.num_hidden_layers):
                for c, b in zip(eng.cache.layer(i), before[i]):
                    c.copy_(b)
            parked = eng.model.parked_passes
            logits = eng.model.forward_groups(groups, eng.cache, pick, stack_rows=64, **kw)
            assert eng.model.parked_passes - parked == (states == "parked")
            runs.append((logits, [tuple(c.clone() for c in eng.cache.layer(i))
                                  for i in range(eng.cfg.num_hidden_layers)]))
        assert launches == [5] * eng.cfg.num_hidden_layers  # one a layer: the slices' 5 sequences
        (alone, kv_alone), (one, kv_one) = runs
        torch.testing.assert_close(one, alone, rtol=1e-5, atol=1e-5)
        ends = [21, 31, 7, 5, 8, 5]  # each cache row's positions written or read
        for i in range(eng.cfg.num_hidden_layers):
            for r, end in enumerate(ends):
                for got, want in zip(kv_one[i], kv_alone[i]):
                    torch.testing.assert_close(got[r, :, :end], want[r, :, :end], rtol=1e-5, atol=1e-5)
    finally:
        eng.close()


def _g(b: int, t: int, row0: int, own_kv: bool = False) -> Group:
    return Group(torch.zeros((b, t), dtype=torch.long), torch.arange(b, dtype=torch.int32) * 3,
                 torch.full((b,), t, dtype=torch.int32), row0, 3 * b + t, (lambda i: None) if own_kv else None)


def test_plan_covers_the_trailing_prompt_slices_only():
    groups = [_g(2, 1, 0), _g(1, 4, 2), _g(2, 3, 3)]
    pos = [g.start_pos.long().view(-1, 1) + torch.arange(g.ids.shape[1]) for g in groups]
    plan = plan_unit(groups, pos, torch.device("cpu"))
    assert (plan.first, plan.row0, plan.rows, plan.max_rows) == (1, 2, 10, 4)
    assert plan.seq_rows.tolist() == [[0, 4, 7], [4, 3, 3]]
    assert plan.seq_cache_row.tolist() == [2, 3, 4] and plan.start.tolist() == [0, 0, 3]
    assert plan.cache_row.tolist() == [2] * 4 + [3] * 3 + [4] * 3
    assert plan.cache_pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert plan.positions.shape == (1, 10)
    assert plan_unit([_g(1, 4, 0), _g(2, 1, 1)], pos[:2], torch.device("cpu")) is None  # decode group last
    assert plan_unit([_g(2, 1, 0), _g(1, 4, 2)], pos[:2], torch.device("cpu")) is None  # one slice: no gain
    own = [_g(1, 4, 0), _g(1, 3, 1, own_kv=True)]  # a paged group's own view: not on the shared cache
    assert plan_unit(own, pos[1:3], torch.device("cpu")) is None
    # right padding (row 1 has 1 real token of 3) is written nowhere: its slots belong to the row's next slice
    padded = Group(torch.zeros((2, 3), dtype=torch.long), torch.tensor([0, 5], dtype=torch.int32),
                   torch.tensor([3, 1], dtype=torch.int32), 0, 6)
    plan = plan_unit([_g(1, 4, 2), padded], [pos[1], torch.zeros((2, 3), dtype=torch.long)], torch.device("cpu"))
    assert plan.cache_pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 5, -1, -1]
    assert plan.q_lens.tolist() == [4, 3, 1] and plan.seq_rows.tolist() == [[0, 4, 7], [4, 3, 3]]


def test_the_warm_up_builds_the_one_launch_kernels_stacked(model_dir, monkeypatch):
    """With the path on, the warm-up's compile-only steps for it (``varlen_steps``: two slices a stack, the longer
    at each bucket's even and odd sizes) run stacked, as served passes do: each lays out a plan."""
    import contextlib

    from engine.serving import warmup
    from engine.serving.scheduler import Scheduler
    if model_dir.name != "tiny-qwen2":
        pytest.skip("the steps, not the maths: one model")
    steps = warmup.varlen_steps(batch=4, chunk=64, max_context=128)
    assert [s.slices for s in steps] == [(2, 2), (3, 2), (4, 2), (7, 2), (8, 2), (15, 2), (16, 2), (31, 2),
                                         (32, 2), (16, 16)]
    assert all(s.dry for s in steps) and warmup.varlen_steps(1, 64, 128) == []
    eng = make_engine(model_dir, kernels="triton", device=DEV, batch=4, max_context=128, prefill_chunk=64)
    try:
        plans = []
        real = plan_unit
        monkeypatch.setattr("engine.model.plan_unit", lambda *a: plans.append(real(*a)) or plans[-1])
        monkeypatch.setattr("engine.model.varlen_enabled", lambda: True)
        monkeypatch.setattr(warmup.ahead, "dry", lambda model: contextlib.nullcontext())  # run them for real
        report = warmup.WarmupReport()
        warmup._run_dry(Scheduler(eng), [steps[3], steps[-1]], report, 60.0)  # noqa: SLF001
        assert len(report.steps) == 2 and report.dry_s > 0
        assert [(p.rows, p.max_rows) for p in plans if p is not None] == [(9, 7), (32, 16)]
    finally:
        eng.close()
