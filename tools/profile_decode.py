"""Where a decode step's GPU time goes: every kernel of a few warm decode steps under torch.profiler.

    python -m tools.profile_decode --model DIR --vram-budget 6GiB [--batch 1] [--steps 8] [--json out.json]

The engine decodes a short greedy prompt as tools/bench_stream.py does (its CUDA graph, when captured, is
replayed: CUPTI still sees each kernel), then ``--steps`` steps run under the profiler. Printed: the step's
wall time, the compute kernels' time per step (their sum, and the part of the step at least one of them
covers: under programmatic dependent launch, kernels/pdl.py, a kernel starts while the one before runs and
waits, so the sum counts those waits twice; the step minus the covered time is launch gaps and waits on the
copy stream), the host-to-device copies per step, and per kind and per kernel the time and the launches
per step. On the CPU (``--device cpu``) the table lists torch's CPU ops instead. Issue 15 reads the AWQ step
off it: GEMVs against the small kernels (norms, rope, KV append, attention, swiglu, x's int8 rounding).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from engine.engine import Engine, EngineOptions
from engine.generate import decode_step, prefill
from memory.units import parse_size

KINDS = (  # (substring of a kernel name, kind); the first match counts
    ("_quant_x_kernel", "x to int8 (int8-x GEMV)"), ("qgemv_i8", "int4 GEMV, int8 x"), ("_qgemv", "int4/int8 GEMV"),
    ("qgemm", "quantized GEMM"), ("ggml", "GGUF GEMV"), ("reduce_split_k", "split-K reduce"),
    ("attention", "attention"), ("flash", "attention"), ("rmsnorm", "norms"), ("rope", "rope"),
    ("kv_append", "KV append"), ("swiglu", "swiglu"), ("embedding", "embedding"), ("argmax", "sampling"),
    ("sampl", "sampling"), ("gemv", "dense GEMV/GEMM"), ("gemm", "dense GEMV/GEMM"), ("nvjet", "dense GEMV/GEMM"),
    ("xmma", "dense GEMV/GEMM"), ("cublas", "dense GEMV/GEMM"), ("Memcpy", "copies"), ("Memset", "copies"),
)


def kind_of(name: str) -> str:
    """The kind of a kernel (or op) by its name; ``other`` when nothing matches."""
    return next((kind for key, kind in KINDS if key.lower() in name.lower()), "other")


def _steps(engine: Engine, batch: int, steps: int, prompt_len: int = 16) -> tuple[torch.Tensor, int]:
    """Prefill a fixed prompt and decode ``steps`` greedy tokens; (last token, next position)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(engine.cfg.vocab_size, 1000), (prompt_len,), generator=g).tolist()] * batch
    engine.cache.reset()
    tok = prefill(engine, prompts).argmax(-1)
    for pos in range(prompt_len, prompt_len + steps):
        tok = decode_step(engine, tok, [pos] * batch).argmax(-1)
    return tok, prompt_len + steps


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def profile_steps(engine: Engine, batch: int, steps: int) -> dict:
    """{"step_ms", "rows": [{"name", "kind", "us_per_step", "launches_per_step"}], "gpu": bool} of ``steps``
    warm decode steps (two untimed steps first: tuning, allocator, graph capture)."""
    from torch.profiler import ProfilerActivity, profile

    tok, pos = _steps(engine, batch, 2)
    gpu = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    _sync(engine)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for i in range(steps):
            tok = decode_step(engine, tok, [pos + i] * batch).argmax(-1)
        _sync(engine)
        wall = time.perf_counter() - t
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and kind_of(e.name) != "copies"] if gpu else []
    return {"step_ms": wall / steps * 1e3, "rows": kernel_rows(prof, gpu, steps), "gpu": gpu, "steps": steps,
            "batch": batch, "covered_ms": covered_us(spans) / steps / 1e3 if gpu else None}


def covered_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals (overlapping kernels counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_rows(prof, gpu: bool, steps: int) -> list[dict]:
    """A finished torch profile's GPU kernels (``gpu``; else CPU ops by self time), summed by name:
    [{"name", "kind", "us_per_step", "launches_per_step"}] over ``steps`` steps, the most time first."""
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if gpu:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += e.time_range.elapsed_us()
                per[e.name][1] += 1
    else:
        for e in prof.key_averages():
            per[e.key][0] += e.self_cpu_time_total
            per[e.key][1] += e.count
    return sorted(({"name": n, "kind": kind_of(n) if gpu else "cpu op", "us_per_step": us / steps,
                    "launches_per_step": c / steps} for n, (us, c) in per.items()), key=lambda r: -r["us_per_step"])


def report(res: dict, top: int = 25) -> list[str]:
    """Printable lines of :func:`profile_steps`' result."""
    rows = res["rows"]
    compute = [r for r in rows if r["kind"] != "copies"]
    busy = sum(r["us_per_step"] for r in compute) / 1e3
    copies = sum(r["us_per_step"] for r in rows if r["kind"] == "copies") / 1e3
    what = "compute kernels" if res["gpu"] else "CPU ops (self time)"
    covered = f", covering {res['covered_ms']:.3f} ms of the step" if res.get("covered_ms") is not None else ""
    lines = [f"batch {res['batch']}, {res['steps']} steps: {res['step_ms']:.3f} ms a step; {what} "
             f"{busy:.3f} ms ({sum(r['launches_per_step'] for r in compute):.0f} launches){covered}; "
             f"copies {copies:.3f} ms"]
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        kinds[r["kind"]][0] += r["us_per_step"]
        kinds[r["kind"]][1] += r["launches_per_step"]
    if res["gpu"] and not compute:
        lines.append("no kernel recorded: this profiler did not see into the graph; rerun with --cuda-graph off")
    lines.append(f"{'kind':28} {'us/step':>9} {'launches':>9}")
    lines += [f"{k:28} {us:9.1f} {n:9.1f}" for k, (us, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])]
    lines.append(f"{'kernel' if res['gpu'] else 'op':72} {'us/step':>9} {'launches':>9}")
    lines += [f"{r['name'][:72]:72} {r['us_per_step']:9.1f} {r['launches_per_step']:9.1f}" for r in rows[:top]]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.profile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (HF layout or tools.synth output)")
    p.add_argument("--vram-budget", default=None, help="e.g. 6GiB (default: everything resident)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled (default 8)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cuda-graph", default="on", choices=["on", "off"],
                   help="replay the decode graph (default), or launch each kernel (off: the launch gaps show)")
    p.add_argument("--json", type=Path, help="also write the per-kernel rows here")
    args = p.parse_args(argv)
    try:
        budget = parse_size(args.vram_budget) if args.vram_budget else None
        if args.batch < 1 or args.steps < 1:
            raise ValueError("--batch and --steps must be >= 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("no CUDA device here: run it on the GPU machine, or pass --device cpu")
        engine = Engine(args.model, EngineOptions(device=args.device, vram_budget=budget, batch=args.batch,
                                                  max_context=64, cuda_graph=args.cuda_graph == "on"))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        res = profile_steps(engine, args.batch, args.steps)
    finally:
        engine.close()
    print("\n".join(report(res)))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
