"""bench/pass_gaps.py: a traced pass's compute-stream gaps split by what the next kernel waited for (the host
queueing it late, or the device), on a hand-made chrome trace."""

from __future__ import annotations

import gzip
import json

from bench.pass_gaps import gaps, load, report


def _kernel(name, ts, dur, corr, stream=7):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, "correlation": corr}}


def _launch(ts, dur, corr, cat="cuda_driver"):
    return {"cat": cat, "name": "cuLaunchKernelEx", "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_gaps_by_cause(tmp_path):
    ms = 1000  # trace times are in us
    events = [
        _launch(0, 5, 1), _kernel("a", 10 * ms, 100 * ms, 1),  # busy 10-110 ms
        _launch(20 * ms, 5, 2), _kernel("b", 150 * ms, 50 * ms, 2),  # queued at 20 ms, ran at 150: 40 ms on the device
        _launch(260 * ms, 10 * ms, 3, "cuda_runtime"), _kernel("c", 275 * ms, 25 * ms, 3),  # queued at 270, idle since
        # 200: 75 ms waiting for the host
        _launch(280 * ms, 5, 4), _kernel("d", 300 * ms + 1, 10 * ms, 4),  # a 1 us gap: under min_us, not counted
        _kernel("copy-stream kernel", 0, 5 * ms, 5, stream=9),  # another stream: not the compute stream
        _kernel("e", 400 * ms, 10 * ms, 99),  # its launch is not in the trace: 90 ms unmatched
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    res = gaps(load(str(path)))
    assert res["stream"] == 7 and res["kernels"] == 5
    assert res["busy_ms"] == 195.0 and res["window_ms"] == 400.0
    assert res["wait_ms"] == 40.0 and res["wait_gaps"] == 1 and res["top_wait"] == [("b", 40.0)]
    assert res["host_ms"] == 75.0 and res["host_gaps"] == 1 and res["top_host"] == [("c", 75.0)]
    assert res["unknown_ms"] == 90.0
    assert "idle waiting for the host 75.0 ms (1 gaps)" in report(res)[0]


def test_no_kernels_is_said():
    assert gaps({"traceEvents": []}) == {"error": "no kernels in the trace (was CUDA activity on?)"}
    assert report({"error": "x"}) == ["x"]
