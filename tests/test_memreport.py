"""CPU tests of tools/memreport.py: the numbers add up, --plan-only on a preset and on headers, a full
CPU run writes a valid memory.png, the timeline analysis finds stalls, bad input exits cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.layout import ALIGN, layer_tensor_shapes
from engine.footprint import min_budget
from tools import memreport
from tools.memreport_timeline import analyze_timeline
from tools.report_render import save_timeline_png
from engine.synth.writer import synthesize

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEYS = {"schema", "mode", "model", "workload", "plan", "modules", "vram", "host", "what_if", "timing", "notes",
        "files"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthesize("tiny-qwen2", tmp_path_factory.mktemp("memreport") / "tiny-qwen2")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = memreport.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, tmp_path: Path, *argv: str) -> dict:
    rc, out, err = run(capsys, *argv, "--json", "--out-dir", str(tmp_path))
    assert rc == 0, err
    return json.loads(out)


def check_png(path: Path) -> None:
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def check_sums(rep: dict) -> None:
    assert KEYS <= set(rep)
    plan, vram = rep["plan"], rep["vram"]
    assert sum(vram["planned"].values()) == vram["planned_total_bytes"] == plan["total_bytes"]
    res = sum(m["bytes"] for m in rep["modules"] if m["placement"] == "resident")
    assert res == plan["resident_weight_bytes"]
    assert res + plan["staging_bytes"] + plan["kv_cache_bytes"] + plan["workspace_bytes"] == plan["total_bytes"]
    assert plan["total_bytes"] <= plan["budget_bytes"] == vram["budget_bytes"]
    assert sum(m["file_bytes"] for m in rep["modules"]) == rep["model"]["file_bytes"]


def test_plan_only_preset_72b_in_24gb_with_64gb_ram(capsys, tmp_path):
    rep = run_json(capsys, tmp_path, "--plan-only", "--preset", "qwen2.5-72b", "--gpu-memory", "24GB",
                   "--host-memory", "64GB")
    check_sums(rep)
    assert rep["mode"] == "plan-only" and rep["timing"] is None and rep["host"]["measured"] is False
    tiers = {(m["placement"], m["tier"]) for m in rep["modules"] if m["kind"] == "layer"}
    assert {("resident", "vram"), ("streamed", "pinned"), ("streamed", "disk")} <= tiers
    assert 0 < rep["plan"]["predicted_tok_s"] < 10
    assert rep["vram"]["card_total_bytes"] == 24 * 10**9
    assert rep["host"]["host_budget_bytes"] == 64 * 10**9 - 64 * 10**9 // 10
    wi = rep["what_if"]
    assert wi["raise_budget_by_bytes"] > 0 and wi["host_budget_for_no_disk_bytes"] > rep["host"]["host_budget_bytes"]
    assert any("1 more layer" in line for line in wi["lines"])
    check_png(Path(rep["files"]["memory_png"]))
    # the text form answers the same question
    rc, out, _ = run(capsys, "--plan-only", "--preset", "qwen2.5-72b", "--gpu-memory", "24GB", "--host-memory",
                     "64GB", "--out-dir", str(tmp_path))
    assert rc == 0
    assert "from disk" in out and "predicted" in out and "WHAT WOULD HAVE TO GIVE" in out


def test_what_if_budget_is_exact(capsys, tmp_path):
    """The budget the what-if names streams one layer less per step; one byte less does not."""
    rep = run_json(capsys, tmp_path, "--plan-only", "--preset", "qwen2.5-7b", "--vram-budget", "6GB",
                   "--host-budget", "64GB", "--h2d-gbps", "25")
    check_sums(rep)
    from engine.footprint import plan_model, tensor_bytes_from_config
    from engine.synth.presets import PRESETS
    cfg = ModelConfig.from_dict(PRESETS["qwen2.5-7b"])
    need = rep["what_if"]["budget_needed_bytes"]
    kw = dict(host_budget=64 * 10**9, h2d_gbps=25.0)
    more = plan_model(cfg, tensor_bytes_from_config(cfg, torch.bfloat16), torch.bfloat16, vram_budget=need, **kw)
    less = plan_model(cfg, tensor_bytes_from_config(cfg, torch.bfloat16), torch.bfloat16, vram_budget=need - 1, **kw)
    def units(p):  # weight bytes streamed per step besides embedding rows
        return len(p.streamed_layers) * p.layer_bytes + (0 if p.lm_head_resident else p.module("lm_head").bytes)
    target = rep["plan"]["streamed_bytes_per_step"] - 3584 * 2 - rep["plan"]["layer_bytes"]  # less the embed row
    assert units(more) <= target < units(less)
    assert rep["what_if"]["budget_needed_bytes"] - rep["what_if"]["raise_budget_by_bytes"] == 6 * 10**9
    assert rep["what_if"]["tok_s_after"] > rep["plan"]["predicted_tok_s"]


def test_plan_only_tiny_checkpoint_bytes_match_headers(capsys, tmp_path, tiny):
    rep = run_json(capsys, tmp_path, "--plan-only", "--model", str(tiny))
    check_sums(rep)
    headers = Checkpoint(tiny).tensors
    assert rep["model"]["file_bytes"] == sum(i.nbytes for i in headers.values())
    groups = len(layer_tensor_shapes(ModelConfig.from_file(tiny / "config.json")))
    for m in rep["modules"]:
        if m["placement"] not in ("resident", "streamed") or (m["name"] == "lm_head" and m["file_bytes"] == 0):
            continue
        if m["kind"] == "layer":  # packed layers align each tensor group to ALIGN bytes
            assert 0 <= m["bytes"] - m["file_bytes"] < ALIGN * groups
        else:
            assert m["bytes"] == m["file_bytes"]


def test_plan_only_tiny_streaming_budget(capsys, tmp_path, tiny):
    cfg = ModelConfig.from_file(tiny / "config.json")
    budget = min_budget(cfg, torch.bfloat16, max_context=64, prefill_chunk=16) + 4096
    rep = run_json(capsys, tmp_path, "--plan-only", "--model", str(tiny), "--vram-budget", f"{budget}B",
                   "--context", "64", "--prefill-chunk", "16", "--host-budget", "1GB")
    check_sums(rep)
    assert rep["plan"]["streamed_layers"] and rep["plan"]["max_context"] == 64
    assert rep["what_if"]["budget_needed_bytes"] > budget


def test_full_cpu_run_writes_memory_png_and_report(capsys, tmp_path, tiny):
    rc, out, err = run(capsys, "--model", str(tiny), "--device", "cpu", "--steps", "3", "--context", "256",
                       "--out-dir", str(tmp_path))
    assert rc == 0, err
    for section in ("VRAM", "HOST", "PLAN", "WHAT WOULD HAVE TO GIVE", "TIME", "process RSS"):
        assert section in out
    assert "predicted" not in out.split("WHAT WOULD HAVE TO GIVE")[0] and "no GPU prediction for a CPU run" in out
    assert "predicted" not in out.split("TIME")[-1].split("NOTES")[0]
    check_png(tmp_path / "memory.png")
    assert not (tmp_path / "timeline.png").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_full_cpu_run_streaming_json(capsys, tmp_path, tiny):
    cfg = ModelConfig.from_file(tiny / "config.json")
    budget = min_budget(cfg, torch.float32, max_context=64, prefill_chunk=16) + 4096
    rep = run_json(capsys, tmp_path, "--model", str(tiny), "--device", "cpu", "--vram-budget", f"{budget}B",
                   "--context", "64", "--prefill-chunk", "16", "--steps", "3")
    check_sums(rep)
    assert rep["mode"] == "cpu" and rep["vram"]["measured"] is None
    host, plan = rep["host"], rep["plan"]
    assert host["measured"] and host["rss_bytes"] > 0
    streamed = sum(m["bytes"] for m in rep["modules"] if m["placement"] == "streamed")
    assert plan["streamed_layers"] and host["host_copies_bytes"] == streamed
    assert rep["timing"]["summary"]["measured_tok_s"] > 0 and rep["timing"]["timeline"] is None
    assert rep["files"]["timeline_png"] is None
    check_png(Path(rep["files"]["memory_png"]))


def test_timeline_analysis_finds_stalls(tmp_path):
    """Two steps of layer.0 (resident), layer.1 and lm_head.0 (streamed); layer.1's copy is late in step 0."""
    def s(lane, name, a, b):
        return {"lane": lane, "name": name, "start_ms": a, "end_ms": b}
    spans = [s("copy", "layer.1", 0.0, 3.0), s("compute", "layer.0", 0.5, 1.0), s("compute", "layer.1", 3.0, 4.0),
             s("copy", "lm_head.0", 3.0, 3.5), s("compute", "lm_head.0", 4.0, 4.5),
             s("copy", "layer.1", 4.0, 5.0), s("copy", "lm_head.0", 5.0, 5.5),
             s("compute", "layer.0", 6.0, 7.0), s("compute", "layer.1", 7.0, 8.0), s("compute", "lm_head.0", 8.0, 8.5)]
    tl = analyze_timeline(spans, [0.0, 6.0, 9.0], {"layer.1": 1_000_000, "lm_head.0": 500_000})
    s0, s1 = tl["steps"]
    assert s0["stall_ms"] == pytest.approx(2.0) and s1["stall_ms"] == 0.0
    assert s0["compute_ms"] == pytest.approx(2.0) and s0["copy_ms"] == pytest.approx(3.5)
    assert s0["streamed_bytes"] == 1_500_000 and s0["copy_gbps"] == pytest.approx(1.5e6 / 3.5 / 1e6)
    assert s1["copy_ms"] == pytest.approx(1.5) and s1["step_ms"] == 3.0
    assert s0["other_ms"] == pytest.approx(6.0 - 2.0 - 2.0)
    mods = {m["name"]: m for m in tl["modules"]}
    assert mods["layer.1"]["stall_ms"] == pytest.approx(1.0) and mods["layer.0"]["bytes"] == 0
    check_png(save_timeline_png(spans, tl, tmp_path / "timeline.png"))


@pytest.mark.parametrize("argv,needle", [
    (["--vram-budget", "6XB"], "--vram-budget: unknown unit"),
    (["--plan-only", "--preset", "qwen2.5-7b", "--gpu-memory", "lots"], "--gpu-memory: cannot parse"),
    (["--model", "/no/such/model/dir"], "does not exist"),
    (["--model", "no-such-model-alias"], "Unknown model"),
    (["--plan-only", "--preset", "no-such-preset"], "unknown --preset"),
    (["--preset", "qwen2.5-7b"], "needs --plan-only"),
    (["--gpu-memory", "24GB"], "--plan-only what-if"),
    (["--plan-only", "--preset", "qwen2.5-72b", "--gpu-memory", "2GB"], "below the minimum"),
    (["--steps", "1"], "--steps must be"),
])
def test_bad_inputs_exit_cleanly(capsys, tmp_path, argv, needle):
    rc, out, err = run(capsys, *argv, "--out-dir", str(tmp_path))
    assert rc != 0 and out == ""
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


@pytest.mark.slow
def test_script_entry_points(tmp_path):
    """Runnable as ``python tools/memreport.py`` (no package context) and as ``python -m tools.memreport``."""
    ok = subprocess.run([sys.executable, str(ROOT / "tools" / "memreport.py"), "--plan-only", "--preset",
                         "qwen2.5-0.5b", "--gpu-memory", "8GB", "--json", "--out-dir", str(tmp_path)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["plan"]["lm_head_resident"] is True
    bad = subprocess.run([sys.executable, "-m", "tools.memreport", "--host-budget=-5GB"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: --host-budget" in bad.stderr and "Traceback" not in bad.stderr


def test_graph_steps_timed_as_generation_runs(tiny):
    """With a captured decode graph, memreport also times steps through it (generation's path)."""
    from tests.helpers import CpuDecodeGraph, make_engine
    from tools.memreport_measure import decode_run
    from tools.memreport_timeline import summarize
    from tools.report_render import _timing

    engine = make_engine(tiny)
    assert engine.graph is None  # CPU: no capture; give it the CPU stand-in
    graph = CpuDecodeGraph(engine.model, engine.cache, engine.opts.batch)
    calls = []
    engine.graph = lambda tok, start: calls.append(1) or graph(tok, start)
    engine.graph.batch = engine.opts.batch
    run_ = decode_run(engine, steps=4, prompt_tokens=5)
    assert len(calls) == 4 and len(run_["graph_step_ms"]) == 3
    summary = summarize(run_, None, 1, engine.plan)
    assert summary["graph_tok_s"] > 0
    lines = _timing({"timing": {"summary": summary, "timeline": None}})
    assert any("generation replays CUDA graphs" in line for line in lines)


def _budget_lines(ax) -> list:
    return [line for line in ax.get_lines() if str(line.get_label()).startswith("budget")]


def test_plan_only_picture_tells_the_streaming_story(capsys, tmp_path):
    from tools.report_render import memory_figure
    rep = run_json(capsys, tmp_path, "--plan-only", "--preset", "qwen2.5-7b", "--vram-budget", "6GB",
                   "--host-budget", "8GB", "--h2d-gbps", "25", "--gpu-memory", "24GB")
    p = rep["plan"]
    streamed, disk = len(p["streamed_layers"]), len(p["disk_layers"])
    assert streamed and disk and rep["vram"]["budget_given"]
    fig, plt = memory_figure(rep)
    ax = fig.axes[0]
    title = ax.get_title()
    assert f"{len(p['resident_layers'])}/28 layers resident, {streamed} streamed ({streamed - disk} from pinned " \
           f"memory, {disk} from disk)" in title
    assert f"predicted {p['predicted_step_s'] * 1e3:.1f} ms/step" in title
    assert len(_budget_lines(ax)) == 1
    plt.close(fig)
    check_png(tmp_path / "memory.png")


def test_no_budget_line_without_a_budget(capsys, tmp_path):
    from tools.report_render import memory_figure
    rep = run_json(capsys, tmp_path, "--plan-only", "--preset", "qwen2.5-7b", "--gpu-memory", "24GB",
                   "--host-budget", "64GB")
    assert rep["vram"]["budget_given"] is False
    fig, plt = memory_figure(rep)
    assert _budget_lines(fig.axes[0]) == [] and any("card" in str(x.get_label()) for x in fig.axes[0].get_lines())
    plt.close(fig)


@pytest.mark.parametrize("total,budget,moved", [(5.0, 5.0, True), (5.0, 5.1, True), (5.0, 4.99, True),
                                                (2.0, 5.0, False), (5.0, 3.0, False), (5.0, None, False)])
def test_total_label_clears_the_budget_line(total, budget, moved):
    from tools.report_render import label_y
    ymax = 6.0
    y = label_y(total, budget, ymax)
    assert (y != total) == moved
    if budget is not None:  # the label [y, y + 4% of the axis] never straddles the budget line
        assert not (y < budget < y + 0.04 * ymax)
