"""Prompt units through the captured-layer path (engine/prompt_graphs.py) give the logits and KV cache of the same
pass run eagerly: on a CPU model a "replay" runs the captured function on the static buffers, so these tests check
the padded layouts (rows up to the bucket, sequences up to the slots), the state copies in and out and the
per-layer, per-slot lookup; the Triton kernels run in the interpreter. The CUDA capture itself is
tests/test_gpu_prompt_graphs.py's."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV  # (sets TRITON_INTERPRET first)

from engine import prompt_graphs  # noqa: E402
from engine.footprint import min_budget  # noqa: E402
from engine.model import Group  # noqa: E402
from engine.varlen import plan_unit  # noqa: E402
from tests.helpers import make_engine, random_prompts  # noqa: E402


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-qwen2-awq"])
def model_dir(request, tmp_path_factory):
    from engine.synth.writer import synthesize
    preset, _, _ = request.param.partition("-awq")
    return synthesize(preset, tmp_path_factory.mktemp("pgraphs") / request.param, dtype="bf16", seed=5,
                      quant="awq" if request.param.endswith("-awq") else None)


@pytest.mark.parametrize("rows,want", [(2048, [2048, 1024, 512, 256, 128]), (1536, [1536, 1024, 512, 256, 128]),
                                       (128, [128]), (100, [100])])
def test_buckets_are_the_stack_then_powers_of_two(rows, want):
    assert prompt_graphs.buckets(rows) == want


def _groups(vocab: int) -> list[Group]:
    """A decode group (rows 0-1: a unit of its own, run eagerly), three prompt slices stacked into one unit of 12
    rows (row 2's two slices, the later reading the earlier's keys; row 3), a lone slice of 7 rows (row 4) and a
    two-row group with right padding (rows 5-6): three units the graphs run, each padded to its bucket."""
    p = random_prompts([7, 5, 7, 6, 3], vocab, seed=9)
    i32 = dict(dtype=torch.int32, device=DEV)
    groups = [Group(torch.tensor([[11], [12]], device=DEV), torch.tensor([20, 30], **i32),
                    torch.ones(2, **i32), 0, 31)]
    for row, ids, start in [(2, p[0][:4], 0), (2, p[0][4:], 4), (3, p[1], 0), (4, p[2], 3)]:
        groups.append(Group(torch.tensor([ids], device=DEV), torch.tensor([start], **i32),
                            torch.tensor([len(ids)], **i32), row, start + len(ids)))
    groups.append(Group(torch.tensor([p[3], p[4] + [0] * 3], device=DEV), torch.tensor([2, 2], **i32),
                        torch.tensor([6, 3], **i32), 5, 8))
    return groups


@pytest.mark.parametrize("host_states", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_graph_units_give_the_eager_logits_and_keys(model_dir, monkeypatch, streamed, host_states):
    """``host_states``: the units' states wait in host memory between layers (streamed: the weight copies
    interleave with theirs)."""
    if host_states and model_dir.name != "tiny-qwen2":
        pytest.skip("the states' places are the plain model's (the layers' maths are the same)")
    monkeypatch.setattr(prompt_graphs, "MIN_ROWS", 4)
    monkeypatch.setattr(prompt_graphs, "PIECES_FROM", 16)  # the largest bucket's MLP in pieces
    monkeypatch.setattr(prompt_graphs, "MIN_BLOCK", 1)  # the buffers' room for a table of longer ones than launched
    kw = dict(kernels="triton", device=DEV, batch=7, max_context=64, prefill_chunk=16)
    if streamed and DEV == "cuda":
        pytest.skip("the tiny model's smallest budget is below a GPU's CUDA context; on the GPU the 7B's streamed "
                    "slots run through the graphs in bench/unit_ab.py")
    if streamed:
        probe = make_engine(model_dir, batch=1, max_context=64)
        kw["vram_budget"] = min_budget(probe.cfg, torch.float32, batch=7, max_context=64, prefill_chunk=16,
                                       quant=probe.quant)
        probe.close()
    eng = make_engine(model_dir, **kw)
    try:
        n = eng.cfg.num_hidden_layers
        assert (eng.plan.num_slots > 0) == streamed, eng.plan
        groups = _groups(eng.cfg.vocab_size)
        pick = [(0, 0, 0), (0, 1, 0), (2, 0, 2), (3, 0, 4), (4, 0, 6), (5, 0, 5), (5, 1, 2)]
        gen = torch.Generator().manual_seed(1)
        for k_cache, v_cache in (eng.cache.layer(i) for i in range(n)):
            k_cache.copy_(torch.randn(k_cache.shape, generator=gen))  # the decode rows' earlier keys
            v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
        before = [tuple(c.clone() for c in eng.cache.layer(i)) for i in range(n)]
        graphs = prompt_graphs.PromptGraphs(eng.model, eng.cache, 16, 4)
        assert graphs.buckets == [16, 8, 4]
        graphs.capture_all()
        runs = []
        for use in (None, graphs):
            for i in range(n):
                for c, b in zip(eng.cache.layer(i), before[i]):
                    c.copy_(b)
            eng.model.prompt_graphs = use
            logits = eng.model.forward_groups(groups, eng.cache, pick, stack_rows=16, host_states=host_states)
            runs.append((logits, [tuple(c.clone() for c in eng.cache.layer(i)) for i in range(n)]))
        assert graphs.replays == 3 * n  # the three prompt units, every layer
        assert host_states == (eng.model.state_host_bytes > 0)
        (eager, kv_eager), (graphed, kv_graphed) = runs
        torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)
        ends = [21, 31, 7, 5, 10, 8, 5]  # each cache row's positions written or read
        for i in range(n):
            for r, end in enumerate(ends):
                for got, want, was in zip(kv_graphed[i], kv_eager[i], before[i]):
                    torch.testing.assert_close(got[r, :, :end], want[r, :, :end], rtol=2e-2, atol=2e-2)
                    # no key past them: a padded row's padding is not written (eager writes row 6's)
                    torch.testing.assert_close(got[r, :, end:], was[r, :, end:], rtol=0, atol=0)
    finally:
        eng.model.prompt_graphs = None
        eng.close()


def test_units_a_graph_cannot_run_stay_eager(tiny_qwen2_dir, monkeypatch):
    """More sequences than the layout's slots, more rows than the largest bucket, a decode group, or the dense tile
    replaced since the capture: no layout (the pass runs those units eagerly)."""
    monkeypatch.setattr(prompt_graphs, "MIN_ROWS", 4)
    eng = make_engine(tiny_qwen2_dir, kernels="triton", device=DEV, batch=7, max_context=64, prefill_chunk=16)
    try:
        graphs = prompt_graphs.PromptGraphs(eng.model, eng.cache, 16, 2)
        graphs.capture_all()
        groups = _groups(eng.cfg.vocab_size)
        pos = [eng.model.positions(g.start_pos, g.ids.shape[1]) for g in groups]
        plan = lambda ks: plan_unit([groups[k] for k in ks], [pos[k] for k in ks], eng.device)  # noqa: E731
        assert graphs.layout(plan([1, 2])) is not None  # two sequences, 5 rows: bucket 8
        assert graphs.layout(plan([1, 2])).b == 8
        assert graphs.layout(plan([1, 2, 3])) is None  # three sequences: more than 2
        assert graphs.layout(plan([0, 1, 2])) is None  # the decode group heads the unit
        dev = eng.device
        long = Group(torch.zeros((1, 17), dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.int32, device=dev),
                     torch.full((1,), 17, dtype=torch.int32, device=dev), 6, 17)
        assert graphs.layout(plan_unit([long], [eng.model.positions(long.start_pos, 17)], eng.device, least=1)) is None
        graphs.enabled = False
        assert graphs.layout(plan([1, 2])) is None
        graphs.enabled = True
        eng.model.ops._tile = torch.empty(8, dtype=torch.uint8, device=dev)
        assert graphs.layout(plan([1, 2])) is None
    finally:
        eng.close()


def test_a_bucket_past_the_context_warms_up_within_the_cache_and_rope_table(tiny_qwen2_dir, monkeypatch):
    """Buckets of more rows than the context (a prefill chunk past --max-context): the capture's warm-up layout keeps
    its positions within the RoPE table and writes no key past the cache."""
    monkeypatch.setattr(prompt_graphs, "MIN_ROWS", 32)
    eng = make_engine(tiny_qwen2_dir, kernels="triton", device=DEV, batch=2, max_context=48, prefill_chunk=16)
    try:
        graphs = prompt_graphs.PromptGraphs(eng.model, eng.cache, 96, 2)
        graphs.capture_all()
        buf = graphs.layout_bufs[96]
        assert int(buf[:96].max()) < eng.model.cos.shape[0]
        assert int(buf[96:192].max()) < eng.cache.layer(0)[0].shape[2] and int(buf[96:192].min()) == -1
    finally:
        eng.close()


def test_served_outputs_equal_with_the_graphs_and_the_step_log_counts_them(tiny_qwen2_dir, monkeypatch, tmp_path):
    """The scheduler on a streamed slot cache, prompts arriving while others decode: the greedy outputs with prompt
    graphs equal those without, and the step log says how many unit layers the graphs ran."""
    import json

    from engine.serving.params import SamplingParams
    from engine.serving.scheduler import Scheduler
    from engine.serving.sequence import Sequence
    from engine.serving.steplog import StepLog
    monkeypatch.setattr(prompt_graphs, "MIN_ROWS", 8)
    probe = make_engine(tiny_qwen2_dir, batch=1, max_context=96)
    kw = dict(kernels="triton", device=DEV, batch=4, max_context=96, prefill_chunk=32,
              vram_budget=min_budget(probe.cfg, torch.float32, batch=4, max_context=96, prefill_chunk=32))
    probe.close()
    if DEV == "cuda":
        kw.pop("vram_budget")
    prompts = random_prompts([30, 41, 12], 1000, seed=42)
    late = random_prompts([9, 20], 1000, seed=43)
    outs, logs = [], []
    for use in (False, True):
        eng = make_engine(tiny_qwen2_dir, **kw)
        log = StepLog(tmp_path / f"steps{use}.jsonl")
        try:
            sched = Scheduler(eng, on_step=log)
            if use:
                eng.model.prompt_graphs = prompt_graphs.try_capture(eng.model, eng.cache, 32, 8)
                for c in (eng.cache.k, eng.cache.v):  # the capture's warm-up wrote keys (a server's warm-up zeroes)
                    c.zero_()
            seqs = [Sequence(p, SamplingParams(max_tokens=3), eng.tokenizer) for p in prompts]
            for s in seqs:
                sched.add(s)
            steps = 0
            while sched.has_work() or steps < 2:
                if steps == 1:
                    seqs += [Sequence(p, SamplingParams(max_tokens=3), eng.tokenizer) for p in late]
                    for s in seqs[-2:]:
                        sched.add(s)
                sched.step()
                steps += 1
            outs.append([s.output_ids for s in seqs])
        finally:
            log.close()
            eng.model.prompt_graphs = None
            eng.close()
        logs.append([json.loads(x) for x in (tmp_path / f"steps{use}.jsonl").read_text().splitlines()])
    assert outs[0] == outs[1]
    assert sum(x["graph_replays"] for x in logs[0]) == 0 and sum(x["graph_replays"] for x in logs[1]) > 0
