"""Issue 16's slow intake pass, isolated: many prompts arriving at once, prefilled in one streamed pass.

    python bench/intake_probe.py --model DIR [--vram-budget 6GiB --max-batch 32 --max-context 2304]
        [--clients 16] [--reps 2] [--variants base,split,piece32,...] [--profile base] [--kv-cache slots]
        [--out probe.json]

The server's scheduler (``engine.LLM``, the one ``engine.serve`` runs) gets ``--clients`` prompts of
128-2048 random tokens at once with ``max_tokens=1``: one pass takes them all (layer-major, prompt states
in host memory at 6 GiB with 32 slots), so the call's time is that pass. Each variant changes how the
prompt states and the weights cross PCIe, as named by '+'-joined parts:

- ``split``: the states' copies out on their own CUDA stream (``LAYERSTREAM_STATE_LANES=2``);
- ``pieceN``: the weight streamer copies a layer in pieces of N MiB (other streams' copies interleave);
- ``pump``: the streamer holds each layer's copy and issues a group's share of it after the group's states
  (``LAYERSTREAM_PUMP_WEIGHTS=1``; with ``pieceN``, or a share is a whole layer);
- ``ringN``: N staging buffers, the host N - 1 chunks ahead of the copies (over the plan's 2 for N > 2);
- ``device``: the states stay on the GPU (over the plan: a compute floor, may run out of memory);
- ``nopack``: with ``--kv-cache paged``, each prompt's last slice keeps a group of its own (no packing);
- ``nopark``: host states stay in host memory (``LAYERSTREAM_PARK_STATES=0``), not in the slot rows' unreached
  KV positions or the paged cache's never-used blocks.

``--kv-cache slots,paged`` runs every variant on each cache in turn (one model load each).

A decode step's time (one streamed pass, no prompt) is printed beside them. ``--profile`` names variants
to run once more under torch.profiler: the compute stream's kernel time and the copies' time per kind.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.probe_server import server_parser, sync  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
import engine.prefill_states as prefill_states  # noqa: E402
from engine.model import Model  # noqa: E402


def apply(llm: LLM, variant: str) -> None:
    """Set the knobs a variant names (every knob back to the default first)."""
    parts = set(variant.split("+")) - {"base"}
    os.environ["LAYERSTREAM_STATE_LANES"] = "2" if "split" in parts else "1"
    os.environ["LAYERSTREAM_PUMP_WEIGHTS"] = "1" if "pump" in parts else "0"
    os.environ["LAYERSTREAM_PARK_STATES"] = "0" if "nopark" in parts else "1"  # states in unreached KV / unused blocks
    stream = getattr(llm.engine.weights, "stream", None)
    piece = next((p for p in parts if p.startswith("piece")), None)
    if stream is not None:
        stream.piece = int(piece[5:]) << 20 if piece else 0
    ring = next((p for p in parts if p.startswith("ring")), None)
    prefill_states.HOST_STATE_RING = int(ring[4:]) if ring else 2
    runner = llm.scheduler.runner
    runner._host_states = (lambda groups: False) if "device" in parts else type(runner)._host_states.__get__(runner)
    runner.pack_slices = "nopack" not in parts
    if runner.cost is not None:  # one pass takes every prompt, whatever the server's pass budget would allow
        runner.cost.budget = lambda floor, cap: cap


_PASSES = [0]


def one_pass(llm: LLM, prompts: list[list[int]]) -> float:
    """One pass over fresh prompts: each call's first token differs, so a paged cache reuses no prefix."""
    _PASSES[0] += 1
    fresh = [[1000 + _PASSES[0]] + p[1:] for p in prompts]
    sync()
    t0 = time.perf_counter()
    llm.generate(fresh, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    sync()
    return time.perf_counter() - t0


class HostClock:
    """Host time inside ``Model.forward_groups`` and, of it, blocked in ``StreamLane.host_waits``."""

    def __init__(self) -> None:
        self.total = self.blocked = 0.0
        lane, model = prefill_states.StreamLane, Model
        self._waits, self._fwd = lane.host_waits, model.forward_groups
        clock = self

        def waits(lane_self, done):
            t = time.perf_counter()
            clock._waits(lane_self, done)
            clock.blocked += time.perf_counter() - t

        def fwd(model_self, *a, **k):
            t = time.perf_counter()
            try:
                return clock._fwd(model_self, *a, **k)
            finally:
                clock.total += time.perf_counter() - t
        lane.host_waits, model.forward_groups = waits, fwd

    def take(self) -> tuple[float, float]:
        out, self.total, self.blocked = (self.total * 1e3, self.blocked * 1e3), 0.0, 0.0
        return out


def profiled(llm: LLM, prompts: list[list[int]], trace: Path | None = None, tag: str = "") -> dict:
    """Kernel and copy time per kind over one pass; with ``trace``, the chrome trace and its overlap."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        wall = one_pass(llm, prompts)
    extra = {}
    if trace is not None:
        import gzip
        import shutil
        from trace_overlap import load, overlap
        raw = trace / f"trace_{tag.replace('+', '_')}.json"
        prof.export_chrome_trace(str(raw))
        extra["overlap"] = overlap(load(str(raw)))
        with open(raw, "rb") as f, gzip.open(f"{raw}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
    kinds: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        if not us or e.key.startswith(("aten::", "cuda", "Activity", "ProfilerStep")):
            continue
        name = e.key
        kind = ("copy HtoD" if "HtoD" in name else "copy DtoH" if "DtoH" in name else "copy DtoD" if "DtoD" in name
                else "gemm" if any(s in name.lower() for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90"))
                else "attention" if "attention" in name else "other kernels")
        kinds[kind] += us / 1e3
    return {"wall_ms": wall * 1e3, "ms_by_kind": dict(kinds), **extra,
            "top": [(e.key[:70], round((getattr(e, "device_time_total", 0.0) or 0.0) / 1e3, 2), e.count)
                    for e in sorted(prof.key_averages(), key=lambda e: -(getattr(e, "device_time_total", 0.0) or 0))[:14]]}


def probe(a: argparse.Namespace, kv_cache: str) -> dict:
    """One model load on ``kv_cache``: the warm-up pass, a decode step, then every variant and profile."""
    llm = LLM(a.model, a.vram_budget, max_batch=a.max_batch, max_context=a.max_context, kv_cache=kv_cache)
    clock = HostClock()
    plan = llm.engine.plan
    print(f"[{kv_cache}] plan: states {plan.prefill_state_place}, chunk {plan.prefill_chunk}, "
          f"{len(plan.resident_layers)} resident layers, {plan.streamed_bytes_per_step / 1e9:.2f} GB a pass", flush=True)
    g = torch.Generator().manual_seed(16)
    lens = torch.randint(128, 2049, (a.clients,), generator=g).tolist()
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lens]
    print(f"{a.clients} prompts, {sum(lens)} tokens", flush=True)
    t = one_pass(llm, [prompts[0][:8]])  # warm: a short prompt, then the whole set once
    t = one_pass(llm, prompts)
    print(f"warm-up pass {t * 1e3:.0f} ms", flush=True)
    steps = llm.generate([prompts[0][:8]], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    del steps
    decode_ms = llm.scheduler.stats.last_step_s * 1e3
    clock.take()  # the warm-up's host time is nobody's
    print(f"a decode step (one streamed pass): {decode_ms:.0f} ms", flush=True)
    out = {"plan": {"states": plan.prefill_state_place, "chunk": plan.prefill_chunk,
                    "pass_gb": plan.streamed_bytes_per_step / 1e9},
           "tokens": sum(lens), "clients": a.clients, "decode_step_ms": decode_ms, "variants": {}, "profiles": {}}
    for v in a.variants.split(","):
        apply(llm, v)
        times, host = [], []
        try:
            for _ in range(a.reps):
                times.append(one_pass(llm, prompts) * 1e3)
                host.append(clock.take())
        except torch.OutOfMemoryError as e:
            print(f"{v:28s} out of memory: {str(e)[:120]}", flush=True)
            out["variants"][v] = {"error": "out of memory"}
            torch.cuda.empty_cache()
            continue
        out["variants"][v] = {"ms": times, "host_ms_in_forward_and_blocked": host}
        print(f"{v:28s} " + "  ".join(f"{x:7.1f} ms" for x in times) + f"   {sum(lens) / min(times) * 1e3:8.0f} tok/s"
              + "   host in pass / blocked: " + ", ".join(f"{t:.0f}/{b:.0f} ms" for t, b in host), flush=True)
    for v in filter(None, a.profile.split(",")):
        apply(llm, v)
        r = profiled(llm, prompts, a.trace, f"{kv_cache}-{v}")
        out["profiles"][v] = r
        print(f"profile {v}: wall {r['wall_ms']:.0f} ms; " +
              ", ".join(f"{k} {ms:.0f} ms" for k, ms in sorted(r["ms_by_kind"].items())), flush=True)
        if "overlap" in r:
            print("    overlap:", json.dumps(r["overlap"]), flush=True)
        for row in r["top"]:
            print("   ", row)
    apply(llm, "base")
    llm.close()
    del llm
    return out


def main() -> None:
    p = server_parser(__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default="base,split+piece32,pump+piece32,pump+piece8,pump+split+piece8,base,"
                                         "pump+piece8")
    p.add_argument("--profile", default="base,pump+piece8", help="comma list of variants to profile once ('' for none)")
    p.add_argument("--kv-cache", default="slots", help="comma list of KV caches (slots, paged), one load each")
    p.add_argument("--out", default="intake_probe.json")
    p.add_argument("--trace", type=Path, help="folder for each profiled variant's chrome trace (gzip) and its overlap")
    a = p.parse_args()
    if a.trace:
        a.trace.mkdir(parents=True, exist_ok=True)
    out = {}
    for kv in a.kv_cache.split(","):
        out[kv] = probe(a, kv)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
