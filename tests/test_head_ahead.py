"""A streamed lm_head copied ahead into lent buffers (streamer/lent.py, engine/head_ahead.py), on the CPU:
the ring skips the lent units, every pass's logits stay those of the resident model, and the ring copies them
again once they are taken back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine import head_ahead
from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.layout import expected_tensors
from engine.model import Group, Model
from engine.ops import TorchOps
from engine.weights import ModelWeights
from streamer.sync import SyncLog
from tests.helpers import make_hf_model, plan_for

CHUNKS = 6  # lm_head chunks (two staging slots: four may be lent)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("ahead"))
    return d


def _load(model_dir: Path, kind: str, device: str = "cpu"):
    cfg = ModelConfig.from_file(model_dir / "config.json")
    ckpt = Checkpoint(model_dir)
    ckpt.validate(expected_tensors(cfg))
    plan = plan_for(cfg, ckpt, kind)
    if kind != "resident":
        plan = replace(plan, lm_head_chunks=CHUNKS, prefill_chunk=8)  # the two prompts' 15 rows: a long pass
    log = SyncLog()
    wm = ModelWeights(ckpt, cfg, plan, device, torch.float32, threads=1, log_sync=log)
    return cfg, wm, Model(cfg, wm, TorchOps(), device, torch.float32, 64), log


def _pass(model: Model, cfg, cache: KVCache, seed: int) -> torch.Tensor:
    """Two prompts (rows 0 and 1) from position 0, through forward_groups: their last tokens' logits."""
    gen, dev = torch.Generator().manual_seed(seed), model.device
    groups = [Group(torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(dev),
                    torch.zeros(1, dtype=torch.int32, device=dev), torch.tensor([n], dtype=torch.int32, device=dev),
                    row, n) for row, n in ((0, 9), (1, 6))]
    return model.forward_groups(groups, cache, [(0, 0, 8), (1, 0, 5)])


def _heads(wm: ModelWeights) -> list[int]:
    return [j for j, u in enumerate(wm.units) if u.name.startswith("lm_head.")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("room_units", [0, 1, 4, 9])
def test_lent_head_chunks_skip_the_ring_and_keep_the_logits(model_dir, monkeypatch, room_units, device):
    """On CUDA the copy stream, its events and the compute stream's waits order the lent copies for real."""
    cfg, wm, model, log = _load(model_dir, "stream-all", device)
    _, _, ref, _ = _load(model_dir, "resident", device)
    heads = _heads(wm)
    assert len(heads) == CHUNKS and wm.plan.num_slots == 2
    size = max(wm.units[j].nbytes for j in heads)
    lent = []
    real = ModelWeights.lend_head
    def lend_head(self, room):
        n = real(self, room)
        if self is wm:
            lent.append(n)
        return n
    monkeypatch.setattr(ModelWeights, "lend_head", lend_head)
    monkeypatch.setenv("LAYERSTREAM_HEAD_AHEAD", "1")
    monkeypatch.setattr(head_ahead, "room", lambda *a: room_units * size)
    cache, ref_cache = (KVCache(cfg, 2, 64, torch.float32, device) for _ in range(2))
    for seed in range(3):  # passes after one that lent keep the ring's slots and order
        out = _pass(model, cfg, cache, seed)
        torch.testing.assert_close(out, _pass(ref, cfg, ref_cache, seed), rtol=1e-5, atol=1e-5)
    n = min(room_units, CHUNKS - 2)  # the first two chunks ride the ring's slots during the last layers
    assert lent == ([sum(wm.units[j].nbytes for j in heads[CHUNKS - n:])] * 3 if room_units else [])
    assert wm.stream.lent.copies == 3 * n
    units = len(wm.units)
    skipped = sorted(g for a, g, _ in log.entries if a == "skip")
    # each pass's last n chunks: none copied into a slot, each read from its lent buffer
    assert skipped == [p * units + k for p in range(3) for k in range(units - n, units)]
    copied = {g for a, g, _ in log.entries if a == "copy"}
    assert not copied & set(skipped) and len(copied) >= 3 * (units - n)
    assert not wm.stream.lent and not wm.stream.skipped  # taken back after every pass


def test_lend_refuses_a_unit_already_on_its_way(model_dir):
    cfg, wm, model, _ = _load(model_dir, "stream-all")
    first, last = 0, _heads(wm)[-1]
    assert not wm.stream.lend(first, [torch.empty(wm.units[first].nbytes, dtype=torch.uint8)])  # in a slot already
    pieces = list(torch.empty(wm.units[last].nbytes, dtype=torch.uint8).split(1000))
    assert wm.stream.lend(last, pieces)
    assert not wm.stream.lend(last, pieces)  # once
    wm.stream.take_back()
    assert not wm.stream.lent


def test_an_interrupted_pass_with_lent_units_restarts_the_ring(model_dir, monkeypatch, caplog):
    """Lent units skipped by the ring but never read (the pass stopped before its head): taking them back
    restarts the ring, so the next pass reads every chunk from a slot again."""
    cfg, wm, model, _ = _load(model_dir, "stream-all")
    _, _, ref, _ = _load(model_dir, "resident")
    heads = _heads(wm)
    for j in heads[2:]:
        assert wm.stream.lend(j, [torch.empty(wm.units[j].nbytes, dtype=torch.uint8)])
    for i in range(cfg.num_hidden_layers):  # the layers, then the first lm_head chunks, and a stop
        wm.layer(i)
        wm.release(i)
    for j in heads[:3]:
        wm.stream.acquire_pieces(j)
        wm.stream.release()
    assert wm.stream.skipped  # chunks 3.. were skipped, never read
    wm.take_head_back()
    assert not wm.stream.skipped and wm.stream.consumed == 0
    cache, ref_cache = (KVCache(cfg, 2, 64, torch.float32, "cpu") for _ in range(2))
    torch.testing.assert_close(_pass(model, cfg, cache, 5), _pass(ref, cfg, ref_cache, 5), rtol=1e-5, atol=1e-5)


def _model(**kw):
    plan = dict(lm_head_resident=False, prefill_chunk=2048, prefill_state_bytes=1000 << 20,
                workspace_bytes=1400 << 20, allocator_bytes=6 << 30)
    cfg = SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return SimpleNamespace(weights=SimpleNamespace(plan=SimpleNamespace(**{**plan, **kw})), cfg=cfg,
                           dtype=torch.bfloat16, device=torch.device("cpu"), lend_head=True)


SPARE = (1000 << 20) - 4096 * 2 * 64 * 2 - head_ahead.MARGIN  # the planned states' room a 4,096-row pass leaves
LAYER = (64 * 64 + 2 * 2 * 16 * 64 + 64 * 64 + 3 * 128 * 64) * 2  # q, k, v, o, gate, up, down in bf16


@pytest.mark.parametrize("case, want", [
    ("head", (None, SPARE)), ("off", (None, None)), ("short", (None, None)), ("resident", (None, None)),
    ("host", (None, None)), ("graphs", (None, None)), ("full", (None, None)), ("retry", (None, None)),
    ("dense", (LAYER, None)), ("both", (LAYER, SPARE - LAYER)), ("one unit", (None, SPARE)), ("dense full", (None, None)),
    ("rows", (None, "spans")), ("rows both", ("spans", "spans"))])
def test_what_a_pass_spares_goes_to_a_widened_layer_and_the_head(monkeypatch, case, want):
    """(each layer's carver for its weights widened once, the head's carver): new allocations of that many bytes,
    the free KV rows' spans (the head's pieces first, each layer's after them), or nothing."""
    monkeypatch.setenv("LAYERSTREAM_HEAD_AHEAD", "0" if case in ("off", "dense", "dense full") else "1")
    monkeypatch.setenv("LAYERSTREAM_DENSE_LAYER",
                       "1" if case in ("dense", "both", "one unit", "dense full", "rows both") else "0")
    full = case in ("full", "dense full") or case.startswith("rows")
    model = _model(lm_head_resident=case == "resident", prefill_state_bytes=4096 * 2 * 64 * 2 if full else 1000 << 20)
    model.lend_head = case != "retry"
    rows, units = (1000 if case == "short" else 4096), (1 if case == "one unit" else 3)
    spans = ([torch.zeros(3000, dtype=torch.bfloat16), torch.zeros(5000, dtype=torch.bfloat16)]
             if case.startswith("rows") else None)
    layer, head = head_ahead.split(model, rows, units, case == "host", case == "graphs",
                                   None if spans is None else lambda: spans)
    if want[1] is None:
        assert head is None
    elif want[1] == "spans":  # whole rows of 1,000 bytes from the largest span first, each piece 16-byte aligned
        assert [p.numel() for p in head(9000, 1000)] == [9000]
        if want[0] is None:  # the head alone carves on
            pieces = head(3000, 1000)  # 992 bytes after 9,008 of 10,000: too few for a row; the next span
            assert [p.numel() for p in pieces] == [3000] and pieces[0].data_ptr() == spans[0].data_ptr()
            assert head(3000, 1000) is None and [p.numel() for p in head(2000, 1000)] == [2000]  # 2,992 left
    else:
        assert [p.numel() for p in head(want[1], 1)] == [want[1]] and head(1, 1) is None
    if want[0] is None:
        assert layer is None
    elif want[0] == "spans":  # each layer carves what the head left, from the same place
        for _ in range(2):
            carve = layer()
            got = carve(3000, 1000)  # the second span (992 bytes after the head's 9,000 + alignment: no row)
            assert [p.numel() for p in got] == [3000] and got[0].data_ptr() == spans[0].data_ptr()
            assert carve(3000, 1000) is None  # 2,992 bytes left after 16-byte alignment
    else:
        carve = layer()
        assert [p.numel() for p in carve(want[0], 1)] == [want[0]] and carve(1, 1) is None


def test_the_runner_names_only_rows_no_sequence_holds_and_no_group_runs(tiny_qwen2_dir, monkeypatch):
    """Sequences of different lengths join and finish over the steps (slots free up between running ones): every
    pass's ``spare_rows`` are rows no running sequence holds and no group of the pass runs (a decode group pads
    across free slots); a paged cache names none."""
    from engine.serving.params import SamplingParams
    from engine.serving.scheduler import Scheduler
    from engine.serving.sequence import Sequence
    from tests.helpers import make_engine, random_prompts
    from tests.sched_helpers import run_all
    for kv in ("slots", "paged"):
        eng = make_engine(tiny_qwen2_dir, batch=6, max_context=64, prefill_chunk=16)  # slots 4-5 never used
        sched = Scheduler(eng, **({"kv_cache": "paged", "block_size": 16} if kv == "paged" else {}))
        seen = []
        real = eng.model.forward_groups

        def forward_groups(groups, cache, pick, *a, spare_rows=None, **k):
            held = {s.slot for s in sched.running}
            ran = {r for g in groups for r in range(g.row0, g.row0 + g.ids.shape[0])}
            seen.append((spare_rows, held, ran))
            return real(groups, cache, pick, *a, spare_rows=spare_rows, **k)
        monkeypatch.setattr(eng.model, "forward_groups", forward_groups)
        prompts = random_prompts([9, 13, 5, 7, 11], eng.cfg.vocab_size, seed=21)
        # slots 1 and 2 finish first; the late prompt takes slot 1, and its passes' decode group (rows 0-3) pads
        # across free slot 2
        seqs = [Sequence(p, SamplingParams(max_tokens=n), eng.tokenizer) for p, n in zip(prompts, [12, 2, 2, 12, 4])]
        run_all(sched, seqs, arrivals={4: 8})
        assert seen
        for spare, held, ran in seen:
            if kv == "paged":
                assert spare is None
            else:
                assert spare == sorted(set(range(6)) - held - ran)
        if kv == "slots":
            assert any(spare for spare, _, _ in seen)  # some pass had free rows to name
            assert any(ran - held for _, held, ran in seen)  # and some ran a free row (a decode group's padding)
        eng.close()


@pytest.mark.parametrize("span_rows, want", [
    (5266, [4224] * 4),  # a burst's free rows on the 7B at 6 GiB (K = 3,584): 56 spans of 5,266 rows
    (20000, [16896]),  # one span holds the chunk whole
    (8500, [8448] * 2),
    (4230, [4224] * 4),
])
def test_a_request_no_span_holds_is_cut_in_equal_pieces(span_rows, want):
    """Pieces of equal rows (multiples of GRANULE) rather than each span's end, so the GEMMs' widths repeat and their
    rows stay 16-byte aligned; the carver moves on past a span's tail too short for the next piece."""
    row = 16  # bytes: the 7B's rows (7,168 bytes) scaled down, the carving depends on rows only
    spans = [torch.zeros(span_rows * row, dtype=torch.uint8) for _ in range(40)]
    carve = head_ahead.SpanCarver(spans)
    for _ in range(3):
        pieces = carve(16896 * row, row)
        assert [p.numel() // row for p in pieces] == want
        assert all(p.data_ptr() % head_ahead.ALIGN == 0 for p in pieces)
    layer = carve.fork()
    for rows, k in ((4608, 8), (37888, 8), (3584, 42)):  # qkv, gate_up, down (K scaled down like the rows)
        got = [p.numel() // (2 * k) for p in layer(rows * k * 2, k * 2)]
        assert sum(got) == rows and len(set(got[:-1])) <= 1 and all(g % head_ahead.GRANULE == 0 for g in got[:-1])


def test_spans_too_short_for_whole_granules_are_filled_row_by_row():
    """Where equal pieces of whole granules cannot fit (spans of a few rows), each span takes what it holds."""
    spans = [torch.zeros(n * 100, dtype=torch.uint8) for n in (7, 5, 3)]
    carve = head_ahead.SpanCarver(spans)
    assert [p.numel() // 100 for p in carve(1400, 100)] == [7, 5, 2]
    assert carve(200, 100) is None  # one row's bytes left (after 16-byte alignment)


def test_free_spans_are_made_only_for_a_pass_that_lends(monkeypatch):
    """A decode step (fewer rows than a prefill chunk) never builds the free rows' views (56+ a step on the 7B)."""
    monkeypatch.setenv("LAYERSTREAM_HEAD_AHEAD", "1")
    made = []
    spans = lambda: made.append(1) or [torch.zeros(4096, dtype=torch.uint8)]  # noqa: E731
    assert head_ahead.split(_model(), 16, 1, True, False, spans) == (None, None) and not made
    assert head_ahead.split(_model(), 4096, 1, True, False, spans)[1] is not None and made
