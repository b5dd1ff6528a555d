"""tools/lane_trace.py: a bench trace's durations fed to the step simulation, on traces written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memory.lane_schedule import StepUnit, simulate
from tools.lane_trace import RESIDENT_S, check, load_spans, main, traced_units

TIDS = {"copy stream": 1, "compute stream": 2, "host lane (CPU)": 3}


def _trace(path: Path, steps: int, host_run: bool) -> Path:
    """Layer 0 streamed (copy 2 ms, compute 1 ms), layer 1 on the host (3 ms; with ``host_run`` layers 1-2 in
    one 6 ms span), lm_head chunk 0 streamed (copy 4 ms, compute 0.5 ms); a step every 12 ms."""
    ev = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": n}} for n, t in TIDS.items()]

    def span(lane: str, name: str, start_ms: float, ms: float) -> None:
        ev.append({"name": name, "ph": "X", "pid": 1, "tid": TIDS[lane], "ts": start_ms * 1e3, "dur": ms * 1e3})
    for k in range(steps):
        t = 12.0 * k
        span("copy stream", "layer.0", t, 2.0)
        span("compute stream", "layer.0", t + 2.0, 1.0)
        span("host lane (CPU)", "layers.1-2" if host_run else "layer.1", t + 3.0, 6.0 if host_run else 3.0)
        span("copy stream", "lm_head.0", t + 3.0, 4.0)
        span("compute stream", "lm_head.0", t + 9.5, 0.5)
    path.write_text(json.dumps({"traceEvents": ev}))
    return path


def _results(d: Path, host: list[int], trace: str = "t.json") -> None:
    r = {"host_layers": host, "lm_head_resident": False, "num_slots": 2, "step_s": 0.012,
         "predicted_step_s": 0.010, "trace_file": trace}
    (d / "hostlane.json").write_text(json.dumps({"meta": {"layers": 3}, "results": [r, {**r, "host_layers": []}]}))


@pytest.mark.parametrize("host_run", [False, True], ids=["one-host-layer", "host-run"])
def test_traced_durations_make_the_units(tmp_path, host_run):
    spans = load_spans(_trace(tmp_path / "t.json", 5, host_run))
    assert {s.lane for s in spans} == {"copy", "gpu", "host"}
    host = {1, 2} if host_run else {1}
    units = traced_units(spans, 3, host, head_resident=False)
    third = StepUnit("host", host_s=3e-3) if host_run else StepUnit("resident", gpu_s=RESIDENT_S)
    want = [StepUnit("streamed", copy_s=2e-3, gpu_s=1e-3), StepUnit("host", host_s=3e-3), third,
            StepUnit("streamed", copy_s=4e-3, gpu_s=0.5e-3)]
    assert [u.where for u in units] == [u.where for u in want]
    for got, exp in zip(units, want):
        assert (got.copy_s, got.gpu_s, got.host_s) == pytest.approx((exp.copy_s, exp.gpu_s, exp.host_s), rel=1e-9)


def test_check_simulates_the_traced_step(tmp_path):
    _trace(tmp_path / "t.json", 5, False)
    _results(tmp_path, [1])
    r = json.loads((tmp_path / "hostlane.json").read_text())["results"][0]
    c = check(r, tmp_path / "t.json", 3)
    units = [StepUnit("streamed", copy_s=2e-3, gpu_s=1e-3), StepUnit("host", host_s=3e-3),
             StepUnit("resident", gpu_s=RESIDENT_S), StepUnit("streamed", copy_s=4e-3, gpu_s=0.5e-3)]
    assert c["simulated_ms"] == pytest.approx(simulate(units, 2).step_s * 1e3, rel=1e-9)
    assert c["lanes_ms"] == pytest.approx(6.0)  # copies 2 + 4 against the chain 1 + 3 + 0.1 + 0.5
    assert (c["host_ms_per_layer"], c["copy_ms_per_layer"], c["step_ms"]) == pytest.approx((3.0, 2.0, 12.0))


def test_the_cli_prints_one_line_per_host_lane_configuration(tmp_path, capsys):
    _trace(tmp_path / "t.json", 5, False)
    _results(tmp_path, [1])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("t.json: step 12.0 ms (planned 10.0)") and "simulated" in out[0]


@pytest.mark.parametrize("case,fragment", [("no-dir", "hostlane.json"), ("no-host", "no host-lane configuration"),
                                           ("two-steps", "at least 3 are needed")])
def test_bad_input_is_one_error_line(tmp_path, capsys, case, fragment):
    d = tmp_path / "r"
    if case != "no-dir":
        d.mkdir()
        _trace(d / "t.json", 2 if case == "two-steps" else 5, False)
        _results(d, [] if case == "no-host" else [1])
    assert main([str(d)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0] and "Traceback" not in err


def test_a_missing_trace_is_skipped(tmp_path, capsys):
    _results(tmp_path, [1], trace="gone.json")
    assert main([str(tmp_path)]) == 0
    assert "gone.json: not found, skipped" in capsys.readouterr().err


def test_bus_adds_the_lane_s_reads_and_the_copies_during_host_layers():
    """A 3 ms host layer overlapped 1 ms by a 1 ms layer copy, 6 MB a layer: the lane 2 GB/s, the copy engine busy
    a third of that time at 6 GB/s, 2 GB/s over it; an lm_head chunk's copy does not count as a layer's."""
    from tools.lane_trace import Span, bus

    spans = []
    for k in range(5):
        t = 12.0 * k
        spans += [Span("gpu", "layer.0", t, t + 1.0), Span("host", "layer.1", t + 3.0, t + 6.0),
                  Span("copy", "layer.0", t + 4.0, t + 5.0), Span("copy", "lm_head.0", t + 3.0, t + 6.0)]
    b = bus(sorted(spans, key=lambda s: s.start_ms), 6_000_000)
    assert b == pytest.approx({"host_gbps": 2.0, "copy_gbps": 2.0, "copy_busy": 1 / 3, "copying_gbps": 6.0})


def test_the_cli_prints_the_bus_when_asked(tmp_path, capsys):
    _trace(tmp_path / "t.json", 5, False)
    _results(tmp_path, [1])
    data = json.loads((tmp_path / "hostlane.json").read_text())
    data["results"][0]["host_layer_read_bytes"] = 6_000_000
    (tmp_path / "hostlane.json").write_text(json.dumps(data))
    assert main([str(tmp_path), "--bus"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[1].startswith("  during host layers: lane 2.0 GB/s + copies 0.0 GB/s (busy 0%")


def test_bus_without_a_layer_size_is_one_error_line(tmp_path, capsys):
    """Results written before bench_stream kept host_layer_read_bytes: --bus asks for --layer-bytes."""
    _trace(tmp_path / "t.json", 5, False)
    _results(tmp_path, [1])
    assert main([str(tmp_path), "--bus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--layer-bytes" in err[0]
    assert main([str(tmp_path), "--bus", "--layer-bytes", "6000000"]) == 0
