"""The streamer's ordering and slot reuse, checked on the CPU through its action log.

On the CPU, copies are synchronous and events do nothing, but the weight manager logs
every copy it issues, every wait of the compute side and every slot it frees. These
tests check the protocol a GPU relies on: a slot is overwritten only after its previous
unit was released, copies run ahead across layer and forward-pass boundaries, and an
interrupted pass restarts cleanly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.layout import expected_tensors
from engine.model import Model
from engine.ops import TorchOps
from engine.weights import ModelWeights
import streamer.files
from streamer.files import SpanReader
from streamer.sync import SyncLog
from streamer.units import Span, UnitSpec
from tests.helpers import forward_decode, forward_prefill, make_hf_model, plan_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("stream"))
    return d


def _load(model_dir: Path, kind: str):
    cfg = ModelConfig.from_file(model_dir / "config.json")
    ckpt = Checkpoint(model_dir)
    ckpt.validate(expected_tensors(cfg))
    plan = plan_for(cfg, ckpt, kind)
    log = SyncLog()
    wm = ModelWeights(ckpt, cfg, plan, "cpu", torch.float32, threads=1, log_sync=log)
    return cfg, plan, wm, Model(cfg, wm, TorchOps(), "cpu", torch.float32, 64), log


def _check_protocol(entries: list[tuple[str, int, int]], n_slots: int) -> None:
    copied, waited, freed = {}, set(), set()
    for k, (action, g, slot) in enumerate(entries):
        assert slot == g % n_slots, f"unit {g} used slot {slot}"
        if action == "copy":
            assert g - n_slots < 0 or g - n_slots in freed, f"slot {slot} overwritten before unit {g - n_slots} was freed"
            assert sum(1 for u in copied if u not in freed) < n_slots, "more copies in flight than slots"
            copied[g] = k
        elif action == "wait":
            assert g in copied, f"unit {g} used before its copy was issued"
            waited.add(g)
        else:
            assert action == "free" and g in waited, f"unit {g} freed before it was used"
            freed.add(g)


@pytest.mark.parametrize("kind", ["stream-all", "stream-partial", "disk-some"])
def test_slot_protocol_over_several_passes(model_dir, kind):
    cfg, plan, wm, model, log = _load(model_dir, kind)
    assert plan.num_slots >= 2 and wm.units
    cache = KVCache(cfg, 1, 64, torch.float32, "cpu")
    ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    logits = forward_prefill(model, cache, ids, last_only=True)
    for pos in range(5, 8):
        logits = forward_decode(model, cache, logits.argmax(-1), pos)
    _check_protocol(log.entries, plan.num_slots)
    units = len(wm.units)
    assert sum(1 for a, _, _ in log.entries if a == "wait") == 4 * units  # every unit, every pass
    # prefetch across the pass boundary: the next pass's first copy is issued before this pass's
    # last unit is used
    first_next = next(k for k, (a, g, _) in enumerate(log.entries) if a == "copy" and g == units)
    last_wait = next(k for k, (a, g, _) in enumerate(log.entries) if a == "wait" and g == units - 1)
    assert first_next < last_wait


def test_interrupted_pass_restarts(model_dir, caplog):
    cfg, plan, wm, model, log = _load(model_dir, "stream-all")
    _, _, _, ref_model, _ = _load(model_dir, "resident")
    cache, ref_cache = (KVCache(cfg, 1, 64, torch.float32, "cpu") for _ in range(2))
    ids = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    first = plan.streamed_layers[0]
    wm.layer(first)  # a pass that stops after running its first streamed layer (e.g. Ctrl-C)
    wm.release(first)
    out = forward_prefill(model, cache, ids, last_only=True)
    assert "restarting" in caplog.text
    torch.testing.assert_close(out, forward_prefill(ref_model, ref_cache, ids, last_only=True), rtol=1e-6, atol=1e-6)


def test_span_reader_and_release_keep_bytes(model_dir, monkeypatch):
    ckpt = Checkpoint(model_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    ref = ckpt.tensor(name).clone()
    info = ckpt.tensors[name]
    file, offset, nbytes = ckpt.raw_span(name)
    reader = SpanReader()
    spans = (Span(file, offset, 100, 0), Span(file, offset + 100, nbytes - 100, 100))  # two spans, one unaligned
    out = torch.empty(nbytes + 64, dtype=torch.uint8)
    monkeypatch.setattr(streamer.files, "CHUNK", 1000)  # several requests per span, one short tail
    for parallel in (False, True):
        out.zero_()
        reader.fill(UnitSpec("t", nbytes, "disk", spans=spans), out, parallel=parallel, drop_cache=parallel)
        assert torch.equal(out[:nbytes].view(info.dtype).view(info.shape), ref)
        assert not out[nbytes:].any()
    part = torch.empty(64, dtype=torch.uint8)
    reader.fill(UnitSpec("part", 64, "disk", spans=(Span(file, offset + 128, 64, 0),)), part)
    assert torch.equal(part, out[128:192])
    reader.close()
    ckpt.release(name)  # pages dropped; reading again re-faults the same bytes
    assert torch.equal(ckpt.tensor(name), ref)
    ckpt.close()


def test_truncated_file_is_a_clear_error(model_dir, tmp_path):
    src = Checkpoint(model_dir)
    file, offset, nbytes = src.raw_span("model.layers.0.mlp.down_proj.weight")
    short = tmp_path / "short.safetensors"
    short.write_bytes(file.read_bytes()[: offset + nbytes // 2])
    reader = SpanReader()
    with pytest.raises(ValueError, match="truncated"):
        reader.fill(UnitSpec("t", nbytes, "disk", spans=(Span(short, offset, nbytes, 0),)),
                    torch.empty(nbytes, dtype=torch.uint8))
    reader.close()


@pytest.mark.parametrize("piece_mb", ["0", "0.00002", "0.0001"])  # one copy; 20-byte and 104-byte pieces
def test_pieces_copy_every_byte(monkeypatch, piece_mb):
    """``LAYERSTREAM_COPY_PIECE_MB`` splits a metered unit's copy into pieces (odd sizes: a short last piece);
    acquiring a unit issues its pieces still held."""
    from streamer.stream import WeightStreamer
    monkeypatch.setenv("LAYERSTREAM_COPY_PIECE_MB", piece_mb)

    def unit(j: int, size: int) -> UnitSpec:
        return UnitSpec(f"u{j}", size, "pinned", pack=lambda buf: buf.copy_(torch.arange(size, dtype=torch.uint8) + j))
    sizes = [100, 257, 64]
    ws = WeightStreamer([], [unit(j, n) for j, n in enumerate(sizes)], 2, 300, "cpu", threads=1)
    assert ws.piece == int(float(piece_mb) * (1 << 20))
    ws.meter(True)
    start = ws.pieces_issued
    for _ in range(2):
        for j, n in enumerate(sizes):
            got = ws.slots[ws.acquire(j)][:n]
            assert torch.equal(got, torch.arange(n, dtype=torch.uint8) + j)
            ws.release()
    ws.meter(False)
    # units 2..7 were queued metered (0 and 1 before): each in ceil(size / piece) pieces
    per = [-(-n // ws.piece) if ws.piece else 1 for n in sizes]
    assert ws.pieces_issued - start == per[2] + per[0] + per[1] + per[2] + per[0] + per[1]
    ws.close()


@pytest.mark.parametrize("kind", ["stream-all", "disk-some"])
def test_metered_copies_interleave_with_host_states(model_dir, monkeypatch, kind):
    """``LAYERSTREAM_PUMP_WEIGHTS=1``: in a pass with host prompt states the streamer holds each layer's
    copy and issues it in shares after the groups' state uploads; the slot protocol holds, every piece is
    issued, and the logits equal the unmetered pass's."""
    import engine.model
    from engine.prefill_states import HostStates, ImmediateLane

    monkeypatch.setenv("LAYERSTREAM_COPY_PIECE_MB", str(2048 / (1 << 20)))  # 2 KiB pieces: many per layer
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    runs = {}
    for pump in ("0", "1"):
        monkeypatch.setenv("LAYERSTREAM_PUMP_WEIGHTS", pump)
        cfg, plan, wm, model, log = _load(model_dir, kind)
        model.host_states = True
        seen: list[tuple[int, int]] = []  # (pieces issued, of units) at each state upload

        class Lane(ImmediateLane):
            def copy(self, pairs, out=False, after=None):
                if not out:
                    seen.append((wm.stream.pieces_issued, wm.stream.issued))
                return super().copy(pairs, out, after)

        monkeypatch.setattr(engine.model, "HostStates", lambda *a, **kw: HostStates(*a, lane=Lane(), **kw))
        cache = KVCache(cfg, 1, 64, torch.float32, "cpu")
        logits = model.prefill(ids, [12], 4, cache)  # 3 groups of 4 tokens
        _check_protocol(log.entries, plan.num_slots)
        assert not wm.stream.queued and not wm.stream.metered  # all issued after the pass
        per_unit = -(-plan.slot_bytes // wm.stream.piece)
        # metered: pieces, not whole units; unmetered: one copy per unit
        assert (wm.stream.pieces_issued >= per_unit) == (pump == "1"), wm.stream.pieces_issued
        runs[pump] = logits, seen
        wm.close()
    assert torch.equal(runs["0"][0], runs["1"][0])
    # metered: the pieces issued move on between a layer's state uploads (each group's share after its
    # states), unmetered they are all on the stream before them
    between = [b[0] - a[0] for a, b in zip(runs["1"][1], runs["1"][1][1:]) if a[1] == b[1]]
    assert any(0 < d < per_unit for d in between), between
    assert all(d == 0 for a, b in zip(runs["0"][1], runs["0"][1][1:]) if a[1] == b[1]
               for d in [b[0] - a[0]])
