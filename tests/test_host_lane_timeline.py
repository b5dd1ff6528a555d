"""The host lane as the third row of the timeline: memreport's analysis and PNG, the Perfetto trace."""

from __future__ import annotations

import json

import pytest

from streamer.trace import write_chrome_trace
from tools.memreport_timeline import analyze_timeline
from tools.report_render import save_timeline_png


def test_the_timeline_has_a_host_lane(tmp_path):
    """Host spans (engine.host_lane traces them on the compute stream) are the timeline's third lane."""
    def s(lane, name, a, b):
        return {"lane": lane, "name": name, "start_ms": a, "end_ms": b}
    spans = [s("copy", "layer.0", 0.0, 2.0), s("compute", "layer.0", 2.0, 2.5), s("host", "layer.1", 2.5, 5.5),
             s("copy", "layer.0", 2.5, 4.5), s("compute", "layer.0", 6.0, 6.5), s("host", "layer.1", 6.5, 9.0)]
    tl = analyze_timeline(spans, [0.0, 6.0, 10.0], {"layer.0": 1000})
    s0, s1 = tl["steps"]
    assert s0["host_ms"] == pytest.approx(3.0) and s1["host_ms"] == pytest.approx(2.5)
    assert s0["other_ms"] == pytest.approx(6.0 - 0.5 - 2.0 - 3.0)  # step - compute - stall - host
    assert tl["host_busy_fraction"] == pytest.approx(5.5 / 10.0)
    assert {m["name"]: m for m in tl["modules"]}["layer.1"]["host_ms"] == pytest.approx(2.75)
    path = tmp_path / "trace.json"
    write_chrome_trace(spans, path)
    events = json.loads(path.read_text())["traceEvents"]
    assert {e["tid"] for e in events if e["ph"] == "X" and e["name"] == "layer.1"} == {3}
    assert any(e["ph"] == "M" and e["args"]["name"] == "host lane (CPU)" for e in events)
    save_timeline_png(spans, tl, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 0


def test_bench_stream_takes_a_list_of_host_compute_modes(capsys):
    from tools.bench_stream import build_parser

    args = build_parser().parse_args(["--model", "m", "--host-compute", "off,auto,2"])
    assert args.host_compute == ["off", "auto", 2]
    assert build_parser().parse_args(["--model", "m"]).host_compute == ["off"]  # today's runs by default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--host-compute", "off,fast"])
    assert "must be auto, off or a number of layers" in capsys.readouterr().err


def test_a_repeated_configuration_gets_its_own_trace_file():
    from tools.bench_stream import trace_name

    written: set[str] = set()
    names = [trace_name("t-trace-b1-3GiB-hostauto", written) for _ in range(3)]
    names.append(trace_name("t-trace-b1-3GiB", written))
    assert names == ["t-trace-b1-3GiB-hostauto.json", "t-trace-b1-3GiB-hostauto-2.json",
                     "t-trace-b1-3GiB-hostauto-3.json", "t-trace-b1-3GiB.json"]
