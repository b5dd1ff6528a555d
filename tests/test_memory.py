"""CPU tests of memory/: size parsing, the VRAM planner and the bandwidth cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from memory import bandwidth
from engine.footprint import min_budget, plan_model, tensor_bytes_from_config
from memory.units import format_size, parse_size

GiB = 2**30
BF16 = torch.bfloat16

QWEN7B = ModelConfig.from_dict({
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16"})
QWEN05B = ModelConfig.from_dict({
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16"})


def plan7b(**kw):
    args = dict(vram_budget=6 * GiB, host_budget=64 * 10**9, batch=1, max_context=4096, h2d_gbps=54.6)
    return plan_model(QWEN7B, tensor_bytes_from_config(QWEN7B, BF16), BF16, **{**args, **kw})


# ----- units -----
@pytest.mark.parametrize("text,expected", [
    ("6GB", 6 * 10**9), ("6 GB", 6 * 10**9), ("6GiB", 6 * GiB), ("6000MB", 6 * 10**9), ("0.5TB", 5 * 10**11),
    ("512MiB", 512 * 2**20), ("1.5gib", 3 * 2**29), ("1073741824", GiB), ("6G", 6 * 10**9), ("6g", 6 * 10**9),
    (" 2 tib ", 2 * 2**40), ("100B", 100), ("0", 0), ("64K", 64_000), ("1.25 KiB", 1280), (".5GB", 5 * 10**8),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,fragment", [
    ("", "empty size"), ("   ", "empty size"), ("abc", "cannot parse size 'abc'"), ("-1GB", "negative"),
    ("6XB", "unknown unit 'xb'"), ("nan", "cannot parse size 'nan'"), ("inf", "cannot parse"),
    ("1.5", "fractional number of bytes"), ("6 G B", "cannot parse"), ("1e9", "cannot parse"),
])
def test_parse_size_rejects_with_clear_message(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert fragment in str(e.value)
    assert 'e.g. "6GB"' in str(e.value)  # says what is accepted


def test_format_size():
    assert format_size(6 * GiB) == "6.00 GiB"
    assert format_size(512) == "512 B"
    assert format_size(466_115_584) == "444.52 MiB"
    assert format_size(3 * 2**40 // 2) == "1.50 TiB"
    assert parse_size(format_size(6 * GiB).replace(" ", "")) == 6 * GiB


# ----- planner: Qwen2.5-7B at 6 GiB -----
def test_7b_sizes_match_published_figures():
    p = plan7b()
    assert p.layer_bytes == 466_115_584  # 233,057,792 bf16 elements, no alignment padding: ~466 MB
    assert p.module("embed_tokens").bytes == p.module("lm_head").bytes == 152064 * 3584 * 2  # 1.09 GB each
    assert p.kv_cache_bytes == 2 * 28 * 1 * 4096 * 4 * 128 * 2
    assert min_budget(QWEN7B, BF16, batch=1, max_context=4096) == (
        p.kv_cache_bytes + p.workspace_bytes + 3584 * 2 + 2 * p.layer_bytes)


def test_7b_at_6gib_fills_the_budget():
    p = plan7b()
    assert p.budget_bytes == 6 * GiB and p.total_bytes <= p.budget_bytes
    assert p.total_bytes == p.resident_weight_bytes + p.staging_bytes + p.kv_cache_bytes + p.workspace_bytes
    assert sum(m.bytes for m in p.modules if m.placement == "resident") == p.resident_weight_bytes
    st = p.streamed_layers
    assert sorted(st + p.resident_layers) == list(range(28)) and st[0] == 0
    gaps = [b - a for a, b in zip(st, st[1:])]
    assert max(gaps) - min(gaps) <= 1, f"streamed layers not spread evenly: {st}"
    assert p.total_bytes + p.layer_bytes > p.budget_bytes  # one more resident layer would not fit
    assert p.num_slots == 2 and p.staging_bytes == 2 * p.layer_bytes and not p.embed_on_device
    assert p.disk_layers == () and p.host_pinned_bytes <= p.host_budget_bytes
    assert 8.5e9 < p.streamed_bytes_per_step < 10e9  # ~9 GB per step
    assert p.predicted_step_s == pytest.approx(p.streamed_bytes_per_step / 54.6e9)
    assert 0.15 < p.predicted_step_s < 0.19 and p.step_bound == "pcie"
    assert p.predicted_tok_s == pytest.approx(1 / p.predicted_step_s)


def test_7b_residency_is_maximal():
    """No other (k layers, lm_head resident?) choice with 2 slots holds more resident bytes."""
    p = plan7b()
    free = p.budget_bytes - p.kv_cache_bytes - p.workspace_bytes - 3584 * 2 - 2 * p.layer_bytes
    head = p.module("lm_head").bytes
    best = max(k * p.layer_bytes + h * head for k in range(29) for h in (0, 1) if k * p.layer_bytes + h * head <= free)
    assert p.resident_weight_bytes - 3584 * 2 == best
    if not p.lm_head_resident:
        assert p.lm_head_chunks * (p.slot_bytes // (3584 * 2)) >= 152064


def test_whole_model_fits_streams_nothing():
    p = plan7b(vram_budget=40 * GiB)
    assert p.streamed_layers == () and p.num_slots == 0 and p.staging_bytes == 0
    assert p.embed_on_device and p.lm_head_resident and p.streamed_bytes_per_step == 0
    assert p.step_bound == "hbm" and any("HBM estimate" in n for n in p.notes)
    assert p.predicted_step_s == pytest.approx((28 * p.layer_bytes + p.module("lm_head").bytes + 3584 * 2) / 2.5e12)


def test_everything_but_embedding_fits():
    p0 = plan7b(vram_budget=40 * GiB)
    p = plan7b(vram_budget=p0.total_bytes - 1)
    assert p.streamed_layers == () and p.lm_head_resident and not p.embed_on_device and p.num_slots == 0
    assert p.streamed_bytes_per_step == 3584 * 2  # one embedding row


def test_budget_below_minimum_names_it():
    minimum = min_budget(QWEN7B, BF16, batch=1, max_context=4096)
    with pytest.raises(ValueError) as e:
        plan7b(vram_budget=minimum - 1)
    msg = str(e.value)
    assert format_size(minimum) in msg and "--max-context" in msg and "--batch" in msg
    assert plan7b(vram_budget=minimum).resident_layers == ()  # exactly the minimum runs


def test_budget_above_free_memory_is_clamped():
    p = plan7b(vram_budget=6 * GiB, device_free=5 * GiB)
    assert p.budget_bytes == 5 * GiB and p.total_bytes <= 5 * GiB
    assert any("clamped" in n and "5.00 GiB" in n for n in p.notes)
    q = plan7b(vram_budget=None, device_free=5 * GiB)
    assert q.budget_bytes == 5 * GiB and any("free memory" in n for n in q.notes)


def test_small_host_budget_sends_last_layers_to_disk():
    """Three layers' bytes pinned, the rest read from disk through the ring of DISK_RING slots, which the budget holds
    too (memory.placement: left out, a plan filled its RAM and the ring went past it)."""
    from memory.placement import DISK_RING
    ring = DISK_RING * 466_115_584
    p = plan7b(host_budget=3 * 466_115_584 + ring + 1000)
    pinned = [i for i in p.streamed_layers if i not in p.disk_layers]
    assert pinned == list(p.streamed_layers[:3]) and p.disk_layers == p.streamed_layers[3:]
    assert all(p.module(f"layers.{i}").tier == "disk" for i in p.disk_layers)
    assert p.host_pinned_bytes == 3 * p.layer_bytes <= p.host_budget_bytes - ring
    assert p.disk_bytes_per_step > 0 and any("disk" in n for n in p.notes)
    slow = plan7b(host_budget=3 * 466_115_584 + ring, disk_gbps=3.0)
    assert slow.step_bound == "disk" and slow.predicted_step_s > p.predicted_step_s


def test_file_dtype_differs_from_compute_dtype():
    tb = tensor_bytes_from_config(QWEN7B, torch.float32)
    p = plan_model(QWEN7B, tb, BF16, vram_budget=6 * GiB, host_budget=0, h2d_gbps=54.6)
    assert p.layer_bytes == plan7b().layer_bytes  # VRAM and PCIe figures use the compute dtype
    assert p.disk_bytes_per_step > 2 * len(p.disk_layers) * 233_000_000  # files are read in fp32


def test_missing_tensor_sizes_are_rejected():
    tb = tensor_bytes_from_config(QWEN7B, BF16)
    del tb["lm_head.weight"]
    with pytest.raises(ValueError, match="lack 1 tensors"):
        plan_model(QWEN7B, tb, BF16, vram_budget=6 * GiB, host_budget=10**10)


def test_default_host_budget_uses_available_memory():
    p = plan7b(host_budget=None)
    assert p.host_budget_bytes >= 0 and any("available minus" in n for n in p.notes)


# ----- tied embeddings (Qwen2.5-0.5B shape) -----
def plan05b(**kw):
    args = dict(host_budget=10**10, batch=1, max_context=4096, h2d_gbps=25.0)
    return plan_model(QWEN05B, tensor_bytes_from_config(QWEN05B, BF16), BF16, **{**args, **kw})


def test_tied_model_fits_with_one_copy():
    p = plan05b(vram_budget=None, device_free=None)  # CPU: everything resident
    assert p.embed_on_device and p.lm_head_resident and p.num_slots == 0
    assert p.module("lm_head").bytes == 0 and p.module("embed_tokens").bytes == 151936 * 896 * 2
    assert p.total_bytes == p.budget_bytes and any("CPU" in n for n in p.notes)


def test_tied_lm_head_streamed_shares_the_host_table():
    minimum = min_budget(QWEN05B, BF16, batch=1, max_context=4096)
    p = plan05b(vram_budget=minimum + 3 * 10**6)
    assert not p.lm_head_resident and not p.embed_on_device and p.lm_head_chunks >= 1
    assert p.module("embed_tokens").tier == p.module("lm_head").tier == "pinned"
    table = p.module("embed_tokens").bytes
    assert p.host_pinned_bytes == len(p.streamed_layers) * p.layer_bytes + table  # the table is pinned once


def test_tied_lm_head_resident_puts_embedding_on_device():
    minimum = min_budget(QWEN05B, BF16, batch=1, max_context=4096)
    p = plan05b(vram_budget=minimum + 151936 * 896 * 2 + 5 * 10**6)
    assert p.lm_head_resident and p.embed_on_device and p.streamed_layers
    assert p.resident_weight_bytes == len(p.resident_layers) * p.layer_bytes + 151936 * 896 * 2 + 896 * 2


def test_third_slot_only_from_leftover_room():
    """A third slot costs a resident layer, so it only comes from room too small for anything else:
    here every layer is resident with a slot to spare, but the (huge-vocab) lm_head cannot fit."""
    cfg = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 200_000})
    tb = tensor_bytes_from_config(cfg, BF16)
    full = plan_model(cfg, tb, BF16, host_budget=10**9)
    fixed = full.kv_cache_bytes + full.workspace_bytes + 256 * 2
    p = plan_model(cfg, tb, BF16, vram_budget=fixed + 5 * full.layer_bytes + 1000, host_budget=10**9)
    assert p.resident_layers == (0, 1) and not p.lm_head_resident and p.num_slots == 3
    assert p.lm_head_chunks == -(-200_000 // (p.slot_bytes // 512)) and p.total_bytes <= p.budget_bytes
    q = plan_model(cfg, tb, BF16, vram_budget=fixed + 5 * full.layer_bytes - 1000, host_budget=10**9)
    assert q.num_slots == 2 and q.resident_layers == (0, 1)  # the spare room is just short of a slot


def test_plan_to_dict_is_json_and_table_renders():
    p = plan7b(host_budget=2 * 466_115_584)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["num_slots"] == p.num_slots and len(d["modules"]) == 28 + 3
    assert d["modules"][1]["name"] == "layers.0"
    text = p.table()
    for word in ("embed_tokens", "lm_head", "KV cache", "workspace", "tok/s", "54.6 GB/s", "disk"):
        assert word in text


# ----- bandwidth -----
def test_h2d_bandwidth_on_cpu_is_the_default(tmp_path):
    gbps, source = bandwidth.h2d_bandwidth("cpu", cache_path=tmp_path / "bw.json")
    assert gbps == 25.0 and source.startswith("default (no CUDA)")
    assert not (tmp_path / "bw.json").exists()


def test_default_cache_path_follows_layerstream_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("LAYERSTREAM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bandwidth.default_cache_path() == tmp_path / "layerstream" / "bandwidth.json"
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "mine"))  # with the tuning and packed-layer caches
    assert bandwidth.default_cache_path() == tmp_path / "mine" / "bandwidth.json"


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bandwidth, "device_key", lambda device: "Fake GPU @ 00000000:01:00.0")
    monkeypatch.setattr(bandwidth, "measure_h2d", lambda device, *a, **k: calls.append(device) or 54.6)
    return calls


def test_bandwidth_cache_round_trip(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.delenv("LAYERSTREAM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bandwidth.h2d_bandwidth("cuda:0") == (54.6, "measured now")
    gbps, source = bandwidth.h2d_bandwidth("cuda:0")
    assert gbps == 54.6 and source.startswith("cached from 20") and len(fake_gpu) == 1
    assert bandwidth.h2d_bandwidth("cuda:0", remeasure=True)[1] == "measured now" and len(fake_gpu) == 2
    path = tmp_path / "layerstream" / "bandwidth.json"
    assert json.loads(path.read_text())["entries"]["Fake GPU @ 00000000:01:00.0"]["gbps"] == 54.6
    assert [p.name for p in path.parent.iterdir()] == ["bandwidth.json"]  # no temp files left


def test_bandwidth_cache_unwritable_or_corrupt(fake_gpu, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert bandwidth.h2d_bandwidth("cuda:0", cache_path=blocker / "bw.json") == (54.6, "measured now")
    assert "cannot write bandwidth cache" in caplog.text
    corrupt = tmp_path / "bw.json"
    corrupt.write_text("{not json")
    assert bandwidth.h2d_bandwidth("cuda:0", cache_path=corrupt)[1] == "measured now"
    assert bandwidth.load_cache(corrupt)  # rewritten with the new entry


def test_the_engines_measurement_pins_a_quarter_gib(monkeypatch, tmp_path):
    sizes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bandwidth, "device_key", lambda device: "Fake GPU @ 00000000:01:00.0")
    monkeypatch.setattr(bandwidth, "measure_h2d", lambda device, nbytes=1 << 30, repeats=5: sizes.append(nbytes) or 50.0)
    bandwidth.h2d_bandwidth("cuda:0", cache_path=tmp_path / "bw.json")
    assert sizes == [256 << 20]


def test_measure_h2d_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        bandwidth.measure_h2d("cpu")


def test_disk_read_bandwidth(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(4 << 20))
    assert bandwidth.disk_read_bandwidth(f, 8 << 20) > 0
    with pytest.raises(ValueError, match="not a file"):
        bandwidth.disk_read_bandwidth(Path(tmp_path / "missing"), 1)



@pytest.mark.parametrize("budget_gib", [2.5, 3, 3.5])
def test_layers_of_different_sizes_fill_the_budget(budget_gib):
    """Layers of two sizes (a GGUF Q4_K_M gives every third layer more bits): the plan keeps as many
    resident as their own bytes allow, not as many as the largest size allows, and stays in budget."""
    from memory.footprint import Footprint, Module
    from memory.planner import make_plan

    big, small = 150 << 20, 130 << 20
    layers = [big if i % 3 == 0 else small for i in range(28)]
    fp = Footprint(modules=(Module("embed_tokens", "embedding", 1 << 30, 1 << 30),
                            *(Module(f"layers.{i}", "layer", b, b) for i, b in enumerate(layers)),
                            Module("norm", "norm", 7168, 7168), Module("lm_head", "lm_head", 450 << 20, 450 << 20)),
                   rows=152064, tied=False, kv_bytes_per_token=57344, act_bytes_per_token=200_000,
                   state_bytes_per_token=14336, logits_bytes_per_seq=152064 * 8, rope_bytes_per_position=512,
                   max_positions=32768, dtype="bfloat16, test")
    p = make_plan(fp, vram_budget=int(budget_gib * GiB), host_budget=64 * 10**9, batch=1, max_context=4096, h2d_gbps=54.6)
    assert p.total_bytes <= p.budget_bytes and p.streamed_layers and p.slot_bytes == big
    resident = p.resident_weight_bytes - 7168 - (p.module("lm_head").bytes if p.lm_head_resident else 0)
    assert resident == sum(layers[i] for i in p.resident_layers)
    free = p.budget_bytes - p.kv_cache_bytes - p.workspace_bytes - 7168 - 2 * big - (
        p.module("lm_head").bytes if p.lm_head_resident else 0)
    assert len(p.resident_layers) > free // big  # more than the largest size alone would allow
    assert free - resident < big  # no further layer fits
