"""The host GEMV rate: measured with torch's CPU matmul, cached per CPU, threads, dtype and batch."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import memory.host_rate as host_rate
from memory.host_rate import host_gemv_rate, host_key, measure_host_gemv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_host_gemv_gives_a_positive_rate(dtype):
    gbps = measure_host_gemv(2, dtype, nbytes=2 << 20, repeats=2, hidden=256)
    assert 0.0 < gbps < 10_000.0


def test_measure_host_gemv_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        measure_host_gemv(0, torch.float32)


def test_host_rate_is_measured_once_and_cached(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(host_rate, "measure_host_gemv", lambda b, d: calls.append((b, d)) or 42.5)
    path = tmp_path / "bw.json"
    assert host_gemv_rate(4, torch.bfloat16, path) == (42.5, "measured now")
    gbps, source = host_gemv_rate(4, torch.bfloat16, path)
    assert gbps == 42.5 and source.startswith("cached from ") and len(calls) == 1
    assert host_gemv_rate(1, torch.bfloat16, path)[1] == "measured now"  # another batch: another entry
    entries = json.loads(path.read_text())["entries"]
    assert host_key(4, torch.bfloat16, torch.get_num_threads()) in entries and len(entries) == 2
    assert host_gemv_rate(4, torch.bfloat16, path, remeasure=True)[1] == "measured now" and len(calls) == 3


def test_a_contended_rate_is_its_own_entry(monkeypatch, tmp_path):
    """Measured next to H2D copies (the host lane's real condition) it is cached apart from the rate alone."""
    entered = []

    class Traffic:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(host_rate, "measure_host_gemv", lambda b, d: 40.0 if entered else 70.0)
    monkeypatch.setattr(host_rate, "h2d_traffic", Traffic)
    path = tmp_path / "bw.json"
    assert host_gemv_rate(1, torch.bfloat16, path) == (70.0, "measured now") and not entered
    assert host_gemv_rate(1, torch.bfloat16, path, contend=torch.device("cuda", 0)) == (40.0, "measured now")
    assert entered == [torch.device("cuda", 0)]
    assert host_gemv_rate(1, torch.bfloat16, path, contend=torch.device("cuda", 0))[0] == 40.0  # cached
    keys = set(json.loads(path.read_text())["entries"])
    assert keys == {host_key(1, torch.bfloat16, torch.get_num_threads()),
                    host_key(1, torch.bfloat16, torch.get_num_threads(), contended=True)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_h2d_traffic_runs_copies_during_the_block():
    from memory.host_rate import h2d_traffic

    with h2d_traffic(torch.device("cuda", 0), nbytes=8 << 20):
        gbps = measure_host_gemv(1, torch.bfloat16, nbytes=64 << 20, repeats=3)
    assert gbps > 0


def test_another_weight_form_is_measured_and_cached_apart(monkeypatch, tmp_path):
    monkeypatch.setattr(host_rate, "measure_host_gemv", lambda b, d: 70.0)
    path = tmp_path / "bw.json"
    seen = []
    int4 = lambda b, d: seen.append((b, d)) or 25.0  # noqa: E731
    assert host_gemv_rate(1, torch.bfloat16, path) == (70.0, "measured now")
    assert host_gemv_rate(1, torch.bfloat16, path, form="int4 g128 CPU kernel", measure=int4) == (25.0, "measured now")
    assert host_gemv_rate(1, torch.bfloat16, path, form="int4 g128 CPU kernel", measure=int4)[0] == 25.0
    assert seen == [(1, torch.bfloat16)]
    keys = set(json.loads(path.read_text())["entries"])
    assert host_key(1, torch.bfloat16, torch.get_num_threads()) + ", int4 g128 CPU kernel" in keys and len(keys) == 2


def test_the_rate_a_host_lane_achieved_is_planned_with_next(monkeypatch, tmp_path):
    """A run's host lane leaves its achieved rate (engine.lane_guard.keep_host_rate); the next plan of the same
    machine, batch, dtype, threads and form takes it over the micro-benchmark (``remeasure`` ignores it)."""
    monkeypatch.setattr(host_rate, "measure_host_gemv", lambda b, d: 36.7)
    path, threads = tmp_path / "bw.json", torch.get_num_threads()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(host_rate, "h2d_traffic", lambda device: contextlib.nullcontext())
    assert host_gemv_rate(1, torch.bfloat16, path, contend=cuda) == (36.7, "measured now")
    host_rate.record_achieved(1, torch.bfloat16, threads, 29.2, cache_path=path)
    gbps, source = host_gemv_rate(1, torch.bfloat16, path, contend=cuda)
    assert gbps == 29.2 and source.startswith("achieved by the host lane on ")
    assert host_gemv_rate(4, torch.bfloat16, path, contend=cuda)[0] == 36.7  # another batch: not this one's
    assert host_gemv_rate(1, torch.bfloat16, path, contend=cuda, form="int4 g128 CPU kernel")[1] == "measured now"
    assert host_gemv_rate(1, torch.bfloat16, path, contend=cuda, remeasure=True) == (36.7, "measured now")
    with pytest.raises(ValueError, match="must be positive"):
        host_rate.record_achieved(1, torch.bfloat16, threads, 0.0, cache_path=path)


def test_an_engine_keeps_its_host_lanes_rate_after_enough_steps(monkeypatch):
    import engine.lane_guard as eng_mod
    from types import SimpleNamespace as NS
    kept = []
    monkeypatch.setattr(eng_mod, "record_achieved", lambda *a: kept.append(a))
    host = NS(steps=8, seconds=0.8, layers=(1, 5), layer_bytes=10**9, worker=NS(pick=NS(threads=15)), weight_form="int4")
    monkeypatch.setattr(eng_mod, "form_name", lambda form, quant, dtype: f"{form} g128 CPU kernel")
    fake = NS(model=NS(host=host), opts=NS(batch=4), dtype=torch.bfloat16, quant=object())
    eng_mod.keep_host_rate(fake)
    assert kept == [(4, torch.bfloat16, 15, pytest.approx(20.0), "int4 g128 CPU kernel")]  # 2 GB x 8 / 0.8 s
    host.steps = 3  # too few steps to say
    eng_mod.keep_host_rate(fake)
    assert len(kept) == 1


def test_the_timed_weight_is_twice_the_last_level_cache_where_that_is_more(tmp_path, monkeypatch):
    for index, (level, size) in enumerate([(1, "48K"), (2, "2048K"), (3, "300M")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    (tmp_path / "index9").mkdir()  # no size file: skipped
    assert host_rate.last_level_cache_bytes(tmp_path) == 300 << 20
    assert host_rate.last_level_cache_bytes(tmp_path / "missing") == 0
    monkeypatch.setattr(host_rate, "last_level_cache_bytes", lambda: 300 << 20)
    assert host_rate.timing_bytes(256 << 20) == 600 << 20
    monkeypatch.setattr(host_rate, "last_level_cache_bytes", lambda: 8 << 20)
    assert host_rate.timing_bytes(256 << 20) == 256 << 20
