"""Rendering for ``tools/memreport.py``: the text report and the two pictures (matplotlib, Agg).

Every file is written atomically: a temporary file in the target directory, then ``os.replace``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from memory.units import format_size as fs
from tools.timeline_render import save_timeline
from tools.timeline_spans import decode_phase, prefill_phase

GiB = 2**30
COLORS = {"resident layers": "#1f77b4", "embedding": "#aec7e8", "lm_head": "#9467bd", "norm": "#c5b0d5",
          "staging slots": "#ff7f0e", "KV cache": "#2ca02c", "activations": "#d62728", "activations/workspace":
          "#d62728", "logits": "#ff9896", "logits (est.)": "#ff9896", "rope tables": "#8c564b",
          "allocator allowance": "#c7c7c7", "allocator slack (reserved - allocated)": "#7f7f7f",
          "CUDA context": "#17becf", "other processes": "#bcbd22", "CUDA context + other processes": "#17becf"}


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling (mode per umask), then rename it over ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _pct(part: float, whole: float | None) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "     -"


# ----- text -----
def _table(rows: list[tuple], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def measured_bar(m: dict) -> dict[str, int]:
    """Measured VRAM of the whole card, by category (CUDA)."""
    bar = dict(m["categories"])
    bar["allocator slack (reserved - allocated)"] = m["allocator_slack_peak_bytes"]
    if m["cuda_context_bytes"] is not None:
        bar["CUDA context"] = m["cuda_context_bytes"]
        bar["other processes"] = m["other_processes_bytes"]
    else:
        bar["CUDA context + other processes"] = m["context_and_others_bytes"]
    return bar


def _headline(rep: dict) -> list[str]:
    p, mod, n = rep["plan"], rep["model"], rep["model"]["layers"]
    cpu = rep["mode"] == "cpu"
    tiers = f"{len(p['streamed_layers'])} streamed ({len(p['streamed_layers']) - len(p['disk_layers'])} pinned, " \
            f"{len(p['disk_layers'])} from disk)"
    out = [f"memreport [{rep['mode']}]  {mod['source']}",
           f"  {mod['model_type']}, {n} layers, {rep['workload']['dtype']}, batch {p['batch']}, context "
           f"{p['max_context']}, prefill chunk {p['prefill_chunk']}",
           f"  fits: {len(p['resident_layers'])}/{n} layers resident, {tiers}, lm_head "
           f"{'resident' if p['lm_head_resident'] else 'streamed'}; {fs(p['streamed_bytes_per_step'])} per step"
           + ("" if cpu else f" over PCIe -> predicted {p['predicted_tok_s']:.3g} tok/s ({p['step_bound']} bound, "
              f"H2D {p['h2d_gbps']:.1f} GB/s {p['h2d_source']})")]
    t = (rep.get("timing") or {}).get("summary")
    if t:
        out.append(f"  measured: {t['measured_tok_s']:.3g} tok/s ({t['step_ms']:.2f} ms/step, median of "
                   f"{t['observed_steps']})" + ("; no GPU prediction for a CPU run" if cpu else
                                                f"; predicted {t['predicted_tok_s']:.3g} tok/s"))
    return out


def _vram(rep: dict) -> list[str]:
    v, m = rep["vram"], rep["vram"]["measured"]
    budget, card = v["budget_bytes"], v["card_total_bytes"]
    out = [f"VRAM  (budget {fs(budget)}, card {fs(card) if card else 'unknown'})"]
    names = list(v["planned"]) + [k for k in (measured_bar(m) if m else {}) if k not in v["planned"]]
    mb = measured_bar(m) if m else {}
    rows = [("category", "planned", "% budget") + (("measured", "% card") if m else ())]
    for k in names:
        r = (k, fs(v["planned"][k]) if k in v["planned"] else "-", _pct(v["planned"].get(k, 0), budget))
        rows.append(r + ((fs(mb[k]) if k in mb else "-", _pct(mb.get(k, 0), card)) if m else ()))
    rows.append(("total", fs(v["planned_total_bytes"]), _pct(v["planned_total_bytes"], budget))
                + ((fs(sum(mb.values())), _pct(sum(mb.values()), card)) if m else ()))
    out += _table(rows, {1, 2, 3, 4})
    if m:
        a, w, r = m["after_load"], m["after_warmup"], m["after_run"]
        out += [f"  torch allocated/reserved: after load {fs(a['allocated'])}/{fs(a['reserved'])}, after run "
                f"{fs(r['allocated'])}/{fs(r['reserved'])}, peak {fs(r['peak_allocated'])}/{fs(r['peak_reserved'])} "
                f"(warm-up pass peak {fs(w['peak_allocated'])})",
                f"  fragmentation: reserved - allocated = {fs(m['allocator_slack_peak_bytes'])} at peak, "
                f"{fs(m['allocator_slack_now_bytes'])} now",
                f"  device used {fs(m['device_used_bytes'])} of {fs(m['device_total_bytes'])}; this process "
                + (fs(m["process_used_bytes"]) if m["process_used_bytes"] is not None else "not visible to NVML")]
        out += [f"  note: {n}" for n in m["notes"]]
    return out


def _host(rep: dict) -> list[str]:
    h = rep["host"]
    out = ["HOST", f"  host budget {fs(h['host_budget_bytes'])} of {fs(h['ram_total_bytes'])} RAM; planned pinned "
           f"{fs(h['pinned_planned_bytes'])}; disk tier {fs(h['disk_tier_bytes'])} (read from the mapped checkpoint)"]
    if h["measured"]:
        kind = "pinned" if h["pinned"] else "host copies (pinned on CUDA)"
        cached = h["checkpoint_mapped_rss_bytes"]
        out += [f"  process RSS {fs(h['rss_bytes'])}; {kind}: {fs(h['host_copies_bytes'])} streamed weights + "
                f"{fs(h['disk_ring_bytes'])} disk ring = {fs(h['pinned_bytes'])}",
                "  checkpoint pages mapped and resident in this process: "
                + (fs(cached) if cached is not None else "not measured (no /proc/self/smaps)")
                + f" ({h['checkpoint_files']} file(s)); RAM available {fs(h['ram_available_bytes'])}"]
    else:
        out.append("  RSS / pinned / page cache: not measured (--plan-only)")
    return out


def _timing(rep: dict) -> list[str]:
    t = rep.get("timing")
    if not t:
        return ["TIME", "  not measured (--plan-only)"]
    s, tl = t["summary"], t["timeline"]
    out = ["TIME", f"  warm-up (prefill + 1 step, kernel JIT/autotune) {s['warmup_ms']:.0f} ms; observed steps "
           f"{s['step_ms']:.2f} ms median -> {s['measured_tok_s']:.3g} tok/s measured"
           + ("" if rep.get("mode") == "cpu" else
              f" vs {s['predicted_tok_s']:.3g} predicted ({s['predicted_step_ms']:.2f} ms/step)")
           + f"; the host issues a step in {s['host_issue_ms']:.2f} ms"]
    if s.get("graph_step_ms"):
        out.append(f"  those steps ran eagerly, traced layer by layer; generation replays CUDA graphs: "
                   f"{s['graph_step_ms']:.2f} ms/step -> {s['graph_tok_s']:.3g} tok/s")
    if not tl:
        return out + ["  copy/compute lanes: not traced (CPU run; tracing uses CUDA events)"]
    if t.get("prefill"):
        p = t["prefill"]
        out.append(f"  traced prefill ({s['prompt_tokens']} tokens, layer-major): {p['window_ms']:.2f} ms; "
                   f"{p['copies']} copies of {p['units_copied']} streamed units (copy lane busy "
                   f"{p['copy_busy_ms']:.2f} ms); "
                   f"compute {p['compute_ms']:.2f} ms in {p['compute_spans']} spans ({p['chunks']} prompt chunk "
                   f"passes); {p['stalls']} stalls {p['stall_ms']:.2f} ms")
    rows = [("step", "ms", "compute", "copy", "host", "stall", "other", "copy GB/s", "eff. GB/s")]
    g = lambda x: f"{x:.1f}" if x is not None else "-"  # noqa: E731
    for i, st in enumerate(tl["steps"]):
        rows.append((i, f"{st['step_ms']:.2f}", f"{st['compute_ms']:.2f}", f"{st['copy_ms']:.2f}",
                     f"{st.get('host_ms', 0.0):.2f}", f"{st['stall_ms']:.2f}", f"{st['other_ms']:.2f}",
                     g(st["copy_gbps"]), g(st["effective_gbps"])))
    out += _table(rows, set(range(1, 9)))
    if "copy_gbps" in s:
        out.append(f"  achieved H2D: {g(s['copy_gbps'])} GB/s while copying, {g(s['effective_gbps'])} GB/s over the "
                   f"step, vs peak {s['peak_h2d_gbps']:.1f} GB/s ({s['h2d_source']}); copy lane busy "
                   f"{100 * tl['copy_busy_fraction']:.0f}%, compute lane {100 * tl['compute_busy_fraction']:.0f}%")
        out.append(f"  verdict: {s['verdict']}")
    rows = [("module", "bytes", "copy ms", "compute ms", "stall ms", "copy GB/s")]
    for m in tl["modules"]:
        gb = m["bytes"] / m["copy_ms"] / 1e6 if m["copy_ms"] > 0 else None
        rows.append((m["name"], fs(m["bytes"]) if m["bytes"] else "resident", f"{m['copy_ms']:.3f}",
                     f"{m['compute_ms']:.3f}", f"{m['stall_ms']:.3f}", g(gb)))
    return out + ["  per module, mean per step:"] + _table(rows, {1, 2, 3, 4, 5})


def render_text(rep: dict) -> str:
    table = rep["plan_table"].split("\n\n")[0].splitlines()
    sections = [_headline(rep), _vram(rep), _host(rep), ["PLAN"] + ["  " + line for line in table],
                ["WHAT WOULD HAVE TO GIVE"] + ["  " + line for line in rep["what_if"]["lines"]], _timing(rep)]
    files = [f"  {k}: {v}" for k, v in rep["files"].items() if v]
    if files:
        sections.append(["FILES"] + files)
    if rep["notes"]:
        sections.append(["NOTES"] + [f"  - {n}" for n in rep["notes"]])
    return "\n\n".join("\n".join(s) for s in sections)


# ----- pictures -----
def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def save_memory_png(rep: dict, path: Path) -> Path:
    """Stacked bars of VRAM by category (planned; measured on CUDA) against the budget and the card."""
    fig, plt = memory_figure(rep)
    return _save(fig, plt, path)


def plan_story(rep: dict) -> str:
    """Two lines for the picture: how many layers stream and from where, and the predicted step."""
    p, n = rep["plan"], rep["model"]["layers"]
    streamed, disk = len(p["streamed_layers"]), len(p["disk_layers"])
    line = f"{len(p['resident_layers'])}/{n} layers resident"
    if streamed:
        line += f", {streamed} streamed ({streamed - disk} from pinned memory, {disk} from disk)"
    line += f"; lm_head {'resident' if p['lm_head_resident'] else 'streamed'}"
    if rep["mode"] == "cpu":
        return line + "\nCPU run: no step-time prediction"
    return line + (f"\n{fs(p['streamed_bytes_per_step'])} streamed per step -> predicted "
                   f"{p['predicted_step_s'] * 1e3:.1f} ms/step ({p['predicted_tok_s']:.3g} tok/s, "
                   f"{p['step_bound']} bound)" + ("; disk reads not counted (give --disk-gbps)"
                                                  if disk and p["step_bound"] != "disk" else ""))


def label_y(total: float, budget: float | None, ymax: float) -> float:
    """Where a bar's total label goes: on top of the bar, or just above the budget line when it would cross it."""
    height = 0.04 * ymax
    if budget is not None and total - 0.01 * ymax <= budget <= total + height:
        return budget + 0.01 * ymax
    return total


def memory_figure(rep: dict):
    """The memory picture as a matplotlib figure: (figure, pyplot)."""
    plt = _figure()
    v = rep["vram"]
    bars = {"planned": v["planned"]}
    if v["measured"]:
        bars["measured (peak)"] = measured_bar(v["measured"])
    budget = v["budget_bytes"] / GiB if v.get("budget_given", True) else None
    card = v["card_total_bytes"] or 0
    top = max([budget or 0] + [sum(c.values()) / GiB for c in bars.values()])
    card_on_scale = card and card / GiB <= 3 * top
    ymax = 1.12 * (max(top, card / GiB) if card_on_scale else top)
    fig, ax = plt.subplots(figsize=(4 + 2.5 * len(bars), 6))
    seen: set[str] = set()
    for x, cats in enumerate(bars.values()):
        _stack(ax, x, cats, ymax, seen)
        total = sum(cats.values()) / GiB
        ax.text(x, label_y(total, budget, ymax), fs(sum(cats.values())), ha="center", va="bottom", fontsize=8,
                fontweight="bold")
    if card_on_scale:
        ax.axhline(card / GiB, color="black", label=f"card {fs(card)}")
    elif card:
        ax.text(0.99, 0.99, f"card: {fs(card)} (off scale)", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    if budget is not None:
        ax.axhline(budget, color="red", linestyle="--", label=f"budget {fs(v['budget_bytes'])}", zorder=3)
    ax.set_ylim(0, ymax)
    ax.set_xticks(range(len(bars)), list(bars))
    ax.set_ylabel("GiB")
    ax.set_title(f"VRAM: {Path(str(rep['model']['source'])).name} ({rep['mode']})\n{plan_story(rep)}", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig, plt


def _stack(ax, x: int, cats: dict[str, int], ymax: float, seen: set[str]) -> None:
    """One stacked bar; each category enters the legend once."""
    bottom = 0.0
    for k, b in cats.items():
        if b <= 0:
            continue
        ax.bar(x, b / GiB, bottom=bottom, width=0.6, color=COLORS.get(k, "#999999"),
               label=None if k in seen else k, edgecolor="white", linewidth=0.5)
        seen.add(k)
        if b / GiB > 0.035 * ymax:
            ax.text(x, bottom + b / GiB / 2, fs(b), ha="center", va="center", fontsize=7)
        bottom += b / GiB


def save_timeline_png(spans: list[dict], timeline: dict, path: Path, prefill_spans: list[dict] | None = None,
                      title: str = "copy vs compute") -> Path:
    """The last two observed decode steps (and the traced prefill, if given), copy above compute, in real
    time and per layer, stalls marked (``tools.timeline_render``)."""
    steps = timeline["steps"]
    bounds = [st["start_ms"] for st in steps] + [steps[-1]["start_ms"] + steps[-1]["step_ms"]]
    phases = [decode_phase(spans, bounds), prefill_phase(prefill_spans) if prefill_spans else None]
    out = save_timeline(phases, path, title)
    assert out is not None, "observed decode steps always hold compute spans"
    return out
