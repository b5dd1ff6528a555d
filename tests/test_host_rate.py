"""The host GEMV rate: measured with torch's CPU matmul, cached per CPU, threads, dtype and batch."""

from __future__ import annotations

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
