"""The copy / compute timeline picture of ``tools.bench_stream`` and ``tools/memreport.py`` (matplotlib, Agg).

Per phase (one or two decode steps, a prefill) two panels, copy lane above compute lane in each:
real time in ms, where a batch-1 step is all copy and its kernels are hairlines (a host-lane row below
compute when a decode step computes layers on the CPU); and a per-layer
axis (``tools.timeline_spans``), where every compute span and every stall is one unit wide, layers are
labelled, stalls are red and hatched with their real ms, and a prefill's prompt chunks are shaded
inside each layer's compute span. Written atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from tools.timeline_spans import Bar, Phase, short_label

COPY, RESIDENT, STREAMED, STALL, HOST = "#ff7f0e", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"
CHUNK_SHADES = ("#00000000", "#ffffff55")  # alternate chunks lighten the compute bar they sit in
Y_COPY, Y_COMPUTE, Y_HOST, H = 1.0, 0.0, -1.0, 0.7


def _barh(ax, bars: list[Bar], y: float, x, **kw) -> int:
    """Bars on one lane through the axis map ``x``; returns how many were drawn."""
    ivs = [(x(b.start), max(x(b.end) - x(b.start), 0.0)) for b in bars]
    if ivs:
        ax.broken_barh(ivs, (y - H / 2, H), **kw)
    return len(ivs)


def _lanes(ax, ph: Phase, x, streamed: set[str]) -> dict[str, int]:
    """Copy, compute (resident / streamed), chunks and stalls through ``x``; counts drawn per lane."""
    edge = dict(edgecolor="white", linewidth=0.3)
    n = {"copy": _barh(ax, ph.copies, Y_COPY, x, facecolors=COPY, label="H2D copy of a streamed unit", **edge)}
    # stalls first: the kernels right after them are drawn on top
    n["stall"] = _barh(ax, ph.stalls, Y_COMPUTE, x, facecolors="#d6272833", edgecolors=STALL, hatch="///",
                       linewidth=0.6, label="stall: compute waits for a copy")
    res = [b for b in ph.computes if b.name not in streamed]
    st = [b for b in ph.computes if b.name in streamed]
    # real-time panels: kernels of microseconds are drawn as hairlines by their own edge
    n["compute"] = _barh(ax, res, Y_COMPUTE, x, facecolors=RESIDENT, edgecolors=RESIDENT, linewidth=0.6,
                         label="compute, resident weights")
    n["compute"] += _barh(ax, st, Y_COMPUTE, x, facecolors=STREAMED, edgecolors=STREAMED, linewidth=0.6,
                          label="compute, streamed weights")
    for k, shade in enumerate(CHUNK_SHADES):
        chunks = [b for b in ph.chunks if int(b.name.rpartition(".")[2] or 0) % 2 == k]
        n[f"chunk{k}"] = _barh(ax, chunks, Y_COMPUTE, x, facecolors=shade, edgecolors="#00000040", linewidth=0.3,
                               label="prompt chunks inside a layer (alternate shades)" if k else None)
    n["chunk"] = n.pop("chunk0") + n.pop("chunk1")
    n["host"] = _barh(ax, ph.hosts, Y_HOST, x, facecolors=HOST, edgecolors=HOST, linewidth=0.6,
                      label="host lane: a layer computed on the CPU")
    return n


def _axes_style(ax, xlabel: str, host: bool = False) -> None:
    ax.set_yticks([Y_HOST, Y_COMPUTE, Y_COPY] if host else [Y_COMPUTE, Y_COPY],
                  (["host (CPU)"] if host else []) + ["compute", "copy (H2D)"])
    ax.set_ylim(-1.6 if host else -0.6, 1.75)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)


def draw_real(ax, ph: Phase, streamed: set[str]) -> dict[str, int]:
    """The phase in real time (ms since its start)."""
    counts = _lanes(ax, ph, lambda t: t - ph.t0, streamed)
    ax.set_xlim(0, ph.t1 - ph.t0)
    _axes_style(ax, "ms since the start of the window (real time)", bool(ph.hosts))
    ax.set_title(f"{ph.title}: {ph.summary()}", fontsize=9, loc="left")
    return counts


def draw_layers(ax, ph: Phase, streamed: set[str]) -> dict[str, int]:
    """The phase on the per-layer axis, layers labelled under their compute spans, stalls in real ms."""
    counts = _lanes(ax, ph, ph.warp, streamed)
    ax.set_xlim(0, ph.knots_x[-1])
    spans = sorted(ph.computes + ph.hosts, key=lambda b: b.start)
    mids = [(ph.warp(b.start) + ph.warp(b.end)) / 2 for b in spans]
    ax.set_xticks(mids, [short_label(b.name) for b in spans], fontsize=6 if len(mids) < 80 else 4,
                  rotation=0 if len(mids) <= 40 else 90)
    if len(ph.stalls) <= 60:
        for s in ph.stalls:
            ax.text((ph.warp(s.start) + ph.warp(s.end)) / 2, Y_COMPUTE + H / 2 + 0.03, f"{s.ms:.2g}",
                    ha="center", va="bottom", fontsize=5, color=STALL)
    for b in ph.copies:  # which unit each copy carries, where there is room
        w = ph.warp(b.end) - ph.warp(b.start)
        if w >= 0.8:
            ax.text(ph.warp(b.start) + w / 2, Y_COPY, short_label(b.name), ha="center", va="center", fontsize=5)
    _axes_style(ax, "per layer, in execution order (layer numbers; h = lm_head chunk): each compute span and each "
                    "stall one unit wide, other gaps 0.3; red numbers: stall ms", bool(ph.hosts))
    return counts


def timeline_figure(phases: list[Phase], title: str):
    """(figure, pyplot, counts): two panels per phase; counts[i] = bars drawn per lane in panel i. A unit
    with a copy in any phase is drawn as streamed."""
    streamed = {b.name for ph in phases for b in ph.copies}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2 * len(phases), 1, figsize=(15, 2.4 * 2 * len(phases)), squeeze=False)
    counts = []
    for i, ph in enumerate(phases):
        counts.append(draw_real(axes[2 * i][0], ph, streamed))
        counts.append(draw_layers(axes[2 * i + 1][0], ph, streamed))
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[1:, 0]:  # the legend once, with every lane any panel drew
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09 if len(phases) == 1 else 0.04, 1, 0.97))  # room for the legend
    return fig, plt, counts


def save_timeline(phases: list[Phase | None], path: Path, title: str) -> Path | None:
    """Write the picture of the phases given (None entries skipped) to ``path``; None when there are none."""
    phases = [p for p in phases if p is not None]
    if not phases:
        return None
    fig, plt, _ = timeline_figure(phases, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path
