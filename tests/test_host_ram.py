"""Host RAM the preflight counts beside the planner's tiers (engine.host_ram, engine.tables, engine.preflight).

* A GGUF embedding of block types is widened straight into the compute dtype, never whole to float32 (a 70B's was
  a 4 GiB uncounted host copy); kept on the host it is counted (``Plan.host_table_bytes``). Loading such a file
  stays within the RAM counted for it (peak anonymous RSS, sampled while the engine loads).
* The host lane's converted weights (the int4 kernel's form, widened copies) are counted per host layer, exactly
  what the lane then holds, and bound how many host layers the RAM left takes.
* The resident layers' pinned upload bounce buffers (a GPU run, while loading) are counted.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch

import engine.gguf.checkpoint as gguf_checkpoint
from engine.config import ModelConfig
from engine.engine import Engine, EngineOptions, open_model
from engine.footprint import min_budget, plan_model, tensor_bytes_from_config
from engine.host_int4 import CONVERT_VALUES, _packed_rows, random_int4
from engine.host_ram import EMBED, load_bounce_bytes, with_host_bytes
from engine.quant.checkpoint import layer_quant
from engine.preflight import (PROCESS_BYTES, InsufficientMemoryError, Machine, PlanBytes, check_fits,
                              host_lane_ram, ram_needed)
from engine.quant.spec import unpack_codes
from engine.synth.presets import resolve_preset
from engine.synth.writer import build_config
from engine.tables import TABLE_CHUNK, device_table
from tools.synth import main as synth_main

GiB, MiB = 2**30, 2**20
HUGE = Machine(1 << 40, 1 << 40, "cpu")  # counts without a limit


def _synth(tmp_path_factory, name: str, *args: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "m"
    assert synth_main(["--preset", "qwen2.5-0.5b", "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def gguf_05b(tmp_path_factory) -> Path:
    """Qwen2.5-0.5B shapes (151936 x 896 embedding, Q8_0 blocks), one layer, as a GGUF file."""
    return _synth(tmp_path_factory, "gguf", "--layers", "1", "--format", "gguf", "--gguf-type", "Q8_0") \
        / "model-Q8_0.gguf"


@pytest.fixture(scope="module")
def awq_05b(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory, "awq", "--layers", "2", "--quant", "awq")


def _tight(model: Path) -> int:
    """A --vram-budget (on the CPU: the "device" part of the RAM) that streams every layer and keeps the embedding
    on the host."""
    files = open_model(model)
    quant = layer_quant(files.ckpt, files.cfg, files.quant, None, 128)
    return min_budget(files.cfg, torch.bfloat16, max_context=128, prefill_chunk=64, quant=quant) + MiB


def _anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def _load_peak(model: Path, **kw) -> tuple[Engine, int]:
    """The engine (on the CPU, bf16) and the peak growth of anonymous RSS while it loaded."""
    files = open_model(model)
    base, peak, done = _anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon())
            time.sleep(0.0005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        eng = Engine(files, EngineOptions(device="cpu", dtype="bf16", max_context=128, prefill_chunk=64, **kw))
    finally:
        done.set()
        t.join()
    return eng, max(peak[0], _anon()) - base


@pytest.mark.parametrize("tight", [False, True], ids=["embedding-on-device", "embedding-on-host"])
def test_loading_a_gguf_block_embedding_stays_within_the_counted_ram(gguf_05b, tight):
    """Widened whole to float32 (545 MB here), then cast, the table took more than the run was counted for."""
    vram = _tight(gguf_05b) if tight else None
    eng, peak = _load_peak(gguf_05b, vram_budget=vram)
    try:
        counted = ram_needed(PlanBytes.of(eng.plan), HUGE) - PROCESS_BYTES
        assert eng.plan.embed_on_device == (vram is None)
        assert eng.weights.embed_table.dtype == torch.bfloat16
        assert peak <= counted, f"peak anonymous RSS growth {peak / MiB:.0f} MiB > counted {counted / MiB:.0f} MiB"
    finally:
        eng.close()


def test_a_gguf_block_embedding_kept_on_the_host_is_counted(gguf_05b):
    files = open_model(gguf_05b)
    eng = Engine(files, EngineOptions(device="cpu", dtype="bf16", max_context=128, prefill_chunk=64,
                                      vram_budget=_tight(gguf_05b)))
    try:
        table = files.cfg.vocab_size * files.cfg.hidden_size * 2
        assert not eng.plan.embed_on_device and eng.weights.embed_table.nbytes == table
        assert eng.plan.host_table_bytes == PlanBytes.of(eng.plan).host_table == table
        assert "embedding table (GGUF blocks widened)" in eng.plan.table()
        counted = PlanBytes.of(eng.plan)
        assert ram_needed(counted, HUGE) - ram_needed(dataclasses.replace(counted, host_table=0), HUGE) == table
    finally:
        eng.close()


def test_a_block_table_goes_to_a_device_in_compute_dtype_row_chunks(gguf_05b, monkeypatch):
    """The GPU path (a meta device stands in): rows widened into bf16 a chunk at a time, none whole to float32."""
    widened = []
    real = gguf_checkpoint.dequantize
    monkeypatch.setattr(gguf_checkpoint, "dequantize",
                        lambda raw, qtype, out: widened.append((out.dtype, out.shape[0])) or real(raw, qtype, out))
    ckpt = open_model(gguf_05b).ckpt
    out = device_table(ckpt, EMBED, torch.bfloat16, torch.device("meta"))
    rows, hidden = ckpt.tensors[EMBED].shape
    assert out.shape == (rows, hidden) and out.dtype == torch.bfloat16
    assert {d for d, _ in widened} == {torch.bfloat16} and sum(n for _, n in widened) == rows
    assert max(n for _, n in widened) == TABLE_CHUNK // (hidden * 4) < rows


@pytest.mark.parametrize("form", ["int4", "widened"])
def test_the_host_lanes_converted_weights_are_counted(awq_05b, gguf_05b, form, monkeypatch):
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", form)
    for model in (awq_05b, gguf_05b) if form == "widened" else (awq_05b,):
        eng = Engine(open_model(model), EngineOptions(device="cpu", dtype="bf16", max_context=128, prefill_chunk=64,
                                                      vram_budget=_tight(model), host_compute="1"))
        try:
            held = eng.model.host.held_bytes
            assert held > 0 and eng.plan.host_lane.held_bytes == PlanBytes.of(eng.plan).host_held == held
            assert "converted weights" in eng.plan.host_lane.summary()
        finally:
            eng.close()


def test_converted_weights_bound_the_host_layers_the_ram_takes():
    cfg = ModelConfig.from_dict(build_config(resolve_preset("qwen2.5-7b"), "bf16"))
    tb = tensor_bytes_from_config(cfg, torch.bfloat16)
    kw = dict(vram_budget=6 * GiB, host_budget=40 * GiB, host_compute=2, host_gbps=20.0, max_context=4096)
    kv = plan_model(cfg, tb, torch.bfloat16, host_ram=64 * GiB, **kw).host_lane.kv_bytes // 2
    plan_model(cfg, tb, torch.bfloat16, host_ram=2 * kv, **kw)  # two layers' KV fit, nothing converted
    with pytest.raises(ValueError, match="room for 1"):
        plan_model(cfg, tb, torch.bfloat16, host_ram=2 * kv, host_held=1, **kw)
    lane = plan_model(cfg, tb, torch.bfloat16, host_ram=64 * GiB, host_held=100 * MiB, **kw).host_lane
    assert lane.held_bytes == 200 * MiB


def test_int4_conversion_in_row_pieces_equals_the_whole(monkeypatch):
    """The CPU packing converted CONVERT_VALUES codes at a time (its int32 codes were 8x the packed bytes)."""
    w = random_int4(1040, 512, 128, seed=1)
    whole = torch._convert_weight_to_int4pack_for_cpu(unpack_codes(w.qweight, 4).to(torch.int32), 2)
    for values in (512 * 16, 512 * 300, CONVERT_VALUES):
        monkeypatch.setattr("engine.host_int4.CONVERT_VALUES", values)
        assert torch.equal(_packed_rows(w.qweight), whole), values


def test_upload_bounce_buffers_are_counted_while_loading():
    """A 7B in bf16 all resident on a GPU: four pinned bounce buffers of a layer (1.7 GiB) while loading."""
    cfg = ModelConfig.from_dict(build_config(resolve_preset("qwen2.5-7b"), "bf16"))
    plan = plan_model(cfg, tensor_bytes_from_config(cfg, torch.bfloat16), torch.bfloat16, vram_budget=40 * GiB,
                      max_context=4096)
    assert not plan.streamed_layers
    cuda = with_host_bytes(plan, object(), cfg, torch.bfloat16, torch.device("cuda"), threads=8)
    assert cuda.load_bounce_bytes == load_bounce_bytes(plan, torch.device("cuda"), 8) == 4 * plan.layer_bytes
    assert load_bounce_bytes(plan, torch.device("cuda"), 2) == 2 * plan.layer_bytes
    assert with_host_bytes(plan, object(), cfg, torch.bfloat16, torch.device("cpu"), 8).load_bounce_bytes == 0
    m = Machine(ram_total=4 * GiB, ram_available=int(2.5 * GiB), device="cuda")  # 1.5 GiB may be used
    check_fits(PlanBytes.of(plan), m, host_budget_given=False)  # the process alone fits
    with pytest.raises(InsufficientMemoryError, match=r"of pinned bounce buffers while the resident layers load.*"
                       r"--threads 1"):
        check_fits(PlanBytes.of(cuda), m, host_budget_given=False)
    assert "while loading" in cuda.table()


def test_bounce_buffers_and_the_held_bytes_are_not_counted_together():
    """The bounce buffers are freed before the pinned tier is filled: the larger phase counts, and a host lane may
    take what is left beside the loaded run."""
    m = Machine(ram_total=16 * GiB, ram_available=12 * GiB, device="cuda")
    p = PlanBytes(GiB, 3 * GiB, 0, "bfloat16", load_bounce=2 * GiB)
    assert ram_needed(p, m) == 3 * GiB + PROCESS_BYTES
    assert ram_needed(PlanBytes(GiB, GiB, 0, "bfloat16", load_bounce=2 * GiB), m) == 2 * GiB + PROCESS_BYTES
    assert host_lane_ram(PlanBytes(GiB, GiB, 0, "bfloat16", load_bounce=8 * GiB), m) == 11 * GiB - GiB - PROCESS_BYTES
