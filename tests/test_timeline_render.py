"""The timeline picture from made-up spans: a simulated copy / compute pipeline (decode steps and a
layer-major prefill) is cut into phases, and the bars, stalls and per-layer axis drawn are checked
against what the simulation knows; the PNG is written and read back."""

from __future__ import annotations

import matplotlib.image
import pytest

from tools.timeline_render import save_timeline, timeline_figure
from tools.timeline_spans import COMPUTE_W, STALL_W, decode_phase, decode_steps, find_stalls, prefill_phase

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def span(lane: str, name: str, a: float, b: float) -> dict:
    return {"lane": lane, "name": name, "start_ms": a, "end_ms": b}


def flat(pairs) -> list[float]:
    """Intervals as one list of floats (pytest.approx compares flat sequences)."""
    return [x for a, b in pairs for x in (a, b)]


def simulate(units: list[tuple[str, float, float]], passes: int, slots: int = 2, chunks: int = 0,
             gap: float = 0.01) -> tuple[list[dict], list[tuple[float, float]]]:
    """``passes`` passes over ``units`` (name, copy ms or 0 for resident, compute ms) through ``slots``
    staging slots: a copy starts when the copy engine is free and its slot was released (the compute of
    the unit ``slots`` streamed units earlier ended); a compute starts ``gap`` after the previous one, or
    when its copy lands. With ``chunks``, each compute span is that many equal "chunk" spans. Returns
    (spans, the stalls the simulation saw: [previous compute end, compute start] when a copy was late)."""
    spans, stalls, comp_end, copy_free, released, k = [], [], 0.0, 0.0, [], 0
    seq = [u for _ in range(passes) for u in units]
    streamed = [i for i, u in enumerate(seq) if u[1] > 0]
    copy_end: dict[int, float] = {}
    for i, (name, copy_ms, ms) in enumerate(seq):
        while k < len(streamed) and k - slots < len(released):  # issue every copy whose slot is free
            j = streamed[k]
            a = max(copy_free, released[k - slots] if k >= slots else 0.0)
            copy_free = copy_end[j] = a + seq[j][1]
            spans.append(span("copy", seq[j][0], a, copy_free))
            k += 1
        start = comp_end + gap
        if copy_ms and copy_end[i] > start:
            stalls.append((comp_end, copy_end[i]))
            start = copy_end[i]
        end = start + ms
        for c in range(chunks):
            spans.append(span("chunk", f"chunk.{c}", start + c * ms / chunks, start + (c + 1) * ms / chunks))
        spans.append(span("compute", name, start, end))
        comp_end = end
        if copy_ms:
            released.append(end)
    return spans, stalls


# 2 resident layers, 4 streamed layers, lm_head in 2 streamed chunks: a batch-1 decode is all copy
DECODE = [("layer.0", 0, 0.05), ("layer.1", 0, 0.05)] + [(f"layer.{i}", 6.0, 0.05) for i in range(2, 6)] \
    + [("lm_head.0", 3.0, 0.03), ("lm_head.1", 3.0, 0.03)]
PREFILL = [(f"layer.{i}", 6.0, 9.0) for i in range(6)] + [("lm_head.0", 3.0, 0.2)]


def test_stalls_are_the_late_copies():
    spans, truth = simulate(DECODE, passes=3)
    assert flat((s.start, s.end) for s in find_stalls(spans)) == pytest.approx(flat(truth))
    assert len(truth) == 3 * 6  # every streamed unit of every pass waits: the copy is 100x the compute


@pytest.mark.parametrize("with_bounds", [False, True])
def test_decode_phase_is_the_last_two_steps_and_every_kernel_is_one_unit_wide(with_bounds):
    spans, truth = simulate(DECODE, passes=4)
    starts = [s["start_ms"] for s in spans if s["lane"] == "compute" and s["name"] == "layer.0"]
    assert len(decode_steps(spans)) == 4 and [w[0] for w in decode_steps(spans)] == starts
    ph = decode_phase(spans, bounds=starts + [spans[-1]["end_ms"]] if with_bounds else None, steps=2)
    assert ph.t0 == starts[2] and ph.title == "decode, last 2 steps"
    assert [b.name for b in ph.computes] == [u[0] for u in DECODE] * 2
    assert len(ph.stalls) == 2 * 6 and flat((s.start, s.end) for s in ph.stalls) == pytest.approx(flat(truth[-12:]))
    # in real time a kernel is a sliver of the window; on the per-layer axis each is one unit wide
    window = ph.t1 - ph.t0
    assert max(b.ms for b in ph.computes) < 0.01 * window
    assert all(ph.warp(b.end) - ph.warp(b.start) == pytest.approx(COMPUTE_W) for b in ph.computes)
    assert all(ph.warp(s.end) - ph.warp(s.start) == pytest.approx(STALL_W) for s in ph.stalls)
    xs = [ph.warp(ph.t0 + window * i / 200) for i in range(201)]
    assert xs == sorted(xs) and xs[0] == 0.0 and xs[-1] == ph.knots_x[-1]
    # copies overlapping the window: the step's own, prefetched ones cut at the window's start
    assert all(ph.t0 <= b.start < b.end <= ph.t1 for b in ph.copies)
    assert {b.name for b in ph.copies} == {u[0] for u in DECODE if u[1]}


def test_prefill_phase_copies_each_streamed_layer_once_then_runs_its_chunks():
    spans, truth = simulate(PREFILL, passes=1, chunks=3)
    end = spans[-1]["end_ms"]  # the freed slots refill with the next pass's first units before the prefill ends
    spans += [span("copy", "layer.0", end - 1.0, end + 5.0), span("copy", "layer.1", end + 5.0, end + 11.0)]
    ph = prefill_phase(spans)
    assert ph.title == "prefill (layer-major, 3 prompt chunks per layer)"
    one = prefill_phase(simulate(PREFILL, passes=1, chunks=1)[0])
    assert one.title == "prefill (layer-major, 1 prompt chunk per layer)"  # as memreport's 2048-token prompt drew it
    assert sorted(b.name for b in ph.copies) == sorted(u[0] for u in PREFILL)  # once each
    assert len(ph.chunks) == 3 * len(PREFILL)
    for c in ph.computes:  # a layer's chunks all sit inside its compute span, after its copy landed
        inside = [k for k in ph.chunks if c.start <= k.start and k.end <= c.end + 1e-9]
        assert len(inside) == 3
        assert c.start >= next(b.end for b in ph.copies if b.name == c.name)
    assert flat((s.start, s.end) for s in ph.stalls) == pytest.approx(flat(truth))
    assert len(truth) == 1  # compute-bound: only the first layer waits (the second copy overlaps its compute)


def test_picture_draws_every_bar_and_writes_a_png(tmp_path):
    dec_spans, dec_truth = simulate(DECODE, passes=3)
    pre_spans, _ = simulate(PREFILL, passes=1, chunks=3)
    dec, pre = decode_phase(dec_spans), prefill_phase(pre_spans)
    fig, plt, counts = timeline_figure([dec, pre], "synthetic")
    plt.close(fig)
    assert len(counts) == 4  # decode real / per layer, prefill real / per layer
    for c in counts[:2]:
        assert c == {"copy": len(dec.copies), "compute": 16, "chunk": 0, "stall": 12, "host": 0}
    for c in counts[2:]:
        assert c == {"copy": len(PREFILL), "compute": len(PREFILL), "chunk": 3 * len(PREFILL), "stall": 1, "host": 0}
    path = save_timeline([dec, None, pre], tmp_path / "timeline.png", "synthetic")
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 600 and img.shape[1] > 1000
    assert save_timeline([None], tmp_path / "none.png", "x") is None and not (tmp_path / "none.png").exists()


def test_memreport_draws_its_observed_steps_and_the_prefill(tmp_path):
    """memreport's path: step events from its analysis pick the window; the TIME section states the prefill."""
    from tools.memreport_timeline import analyze_timeline
    from tools.report_render import _timing, save_timeline_png
    dec_spans, _ = simulate(DECODE, passes=3)
    pre_spans, _ = simulate(PREFILL, passes=1, chunks=3)
    starts = [s["start_ms"] for s in dec_spans if s["lane"] == "compute" and s["name"] == "layer.0"]
    bounds = starts + [dec_spans[-1]["end_ms"]]
    tl = analyze_timeline(dec_spans, bounds, {u[0]: 1000 for u in DECODE if u[1]})
    path = save_timeline_png(dec_spans, tl, tmp_path / "timeline.png", pre_spans, "synthetic")
    assert matplotlib.image.imread(path).shape[0] > 600
    stats = prefill_phase(pre_spans).stats()
    assert stats["copies"] == stats["units_copied"] == len(PREFILL) and stats["chunks"] == 3 * len(PREFILL)
    summary = {"warmup_ms": 1.0, "step_ms": 30.0, "measured_tok_s": 33.0, "host_issue_ms": 0.5, "prompt_tokens": 40}
    lines = _timing({"mode": "cpu", "timing": {"summary": summary, "timeline": tl, "prefill": stats}})
    line = next(x for x in lines if "traced prefill" in x)
    assert f"{len(PREFILL)} copies of {len(PREFILL)} streamed units" in line and "1 stalls" in line


def test_host_lane_is_a_third_row_with_its_layers_one_unit_wide(tmp_path):
    """A decode step whose layer 2 runs on the CPU: its host span is drawn on its own row and, on the
    per-layer axis, gets one unit of width like a kernel."""
    spans = [span("compute", "layer.0", 0.0, 0.1), span("copy", "layer.1", 0.0, 5.0),
             span("compute", "layer.1", 5.0, 5.1), span("host", "layer.2", 5.2, 9.2),
             span("compute", "layer.3", 9.3, 9.4)]
    ph = decode_phase(spans, bounds=[0.0, 9.5])
    assert [b.name for b in ph.hosts] == ["layer.2"] and ph.stats()["host_ms"] == pytest.approx(4.0)
    assert ph.warp(9.2) - ph.warp(5.2) == pytest.approx(1.0)
    fig, plt, counts = timeline_figure([ph], "host lane")
    plt.close(fig)
    assert counts[0]["host"] == counts[1]["host"] == 1 and counts[0]["compute"] == 3
    assert save_timeline([ph], tmp_path / "host.png", "host lane").read_bytes()[:8] == PNG_MAGIC
