"""GPU-only: memreport traces a layer-major prefill and draws it with the decode steps.

Every streamed unit is copied exactly once in the traced prefill, every layer's compute span holds one
span per prompt chunk, and the decode steps' stalls are those memreport's analysis counts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from tools import memreport
from tools.timeline_spans import decode_phase, prefill_phase

pytestmark = pytest.mark.cuda  # skipped without CUDA by tests/conftest.py


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from engine.synth.writer import synthesize
    out = tmp_path_factory.mktemp("q05") / "qwen2.5-0.5b"
    synthesize("qwen2.5-0.5b", out, dtype="bf16", seed=0, layers=12, device="cuda")
    return out


def test_memreport_traces_a_prefill_and_draws_both_phases(small_model, tmp_path):
    from engine.config import ModelConfig
    from engine.engine import outside_allocator
    from engine.footprint import plan_model
    cfg = ModelConfig.from_file(small_model / "config.json")
    full = plan_model(cfg, None, torch.bfloat16, max_context=512)
    budget = full.total_bytes // 2 + outside_allocator(torch.device("cuda")).bytes  # about half the layers stream
    args = memreport.build_parser().parse_args(
        ["--model", str(small_model), "--vram-budget", f"{budget}B", "--context", "512", "--prefill-chunk", "16",
         "--prompt-tokens", "40", "--steps", "6", "--json", "--out-dir", str(tmp_path)])
    rep, spans = memreport.build_report(args)
    plan = rep["plan"]
    assert plan["streamed_layers"], "the budget should make layers stream"
    pre = spans["prefill"]
    ph = prefill_phase(pre)
    copies = Counter(b.name for b in ph.copies)  # without the copies prefetching the decode's first units
    streamed = {f"layer.{i}" for i in plan["streamed_layers"]}
    assert streamed <= set(copies) and set(copies.values()) == {1}  # each streamed unit crossed once
    layers = [s for s in pre if s["lane"] == "compute" and s["name"].startswith("layer.")]
    assert sorted(s["name"] for s in layers) == sorted(f"layer.{i}" for i in range(cfg.num_hidden_layers))
    chunks = [s for s in pre if s["lane"] == "chunk"]
    assert len(chunks) == 3 * cfg.num_hidden_layers  # 40 tokens in chunks of 16
    for c in layers:
        inside = [k for k in chunks if c["start_ms"] <= k["start_ms"] and k["end_ms"] <= c["end_ms"]]
        assert len(inside) == 3, c
    assert ph.title == "prefill (layer-major, 3 prompt chunks per layer)"
    tl = rep["timing"]["timeline"]
    bounds = [st["start_ms"] for st in tl["steps"]] + [tl["steps"][-1]["start_ms"] + tl["steps"][-1]["step_ms"]]
    dec = decode_phase(spans["decode"], bounds)
    assert len([c for c in dec.computes if c.name == "layer.0"]) == 2
    memreport.write_outputs(rep, spans, tmp_path)
    assert Path(rep["files"]["timeline_png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(rep["files"]["prefill_trace_json"]).is_file()
