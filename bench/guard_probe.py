"""Every decode step's time across a host lane's retirement (issue 18's guard on a GPU).

Session 40 (bench/results/2026-12-05-h100-s40/call1/guard_lie.txt): a lane planned from host rates 4x those
measured was retired after 11 steps, yet the run decoded at 2.17 tok/s, where streaming every layer from the start
gave 4.84. This probe runs one generation with ``--host-compute auto`` (planned from whatever the host-rate cache
holds: run bench/lie_host_rate.py first to make it lose) and prints each decode step's wall time, marking where
the guard shrank or retired the lane, then a second generation on the same engine (the lane as the guard left it;
the decode graph captured again since session 40) and a third without the graph (eager steps); each with the
streamer's bytes a step.

    PYTHONPATH=. python bench/guard_probe.py --model /tmp/q7b --vram-budget 6GB --tokens 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import engine.generate as gen
from engine.engine import Engine, EngineOptions
from engine.sampling import SamplingParams
from memory.units import parse_size


def timed_generation(engine: Engine, prompt: list[int], tokens: int, tag: str) -> list[float]:
    """Generate greedily, printing each decode step's seconds (from one call's start to the next's)."""
    marks: list[float] = []
    real = gen.decode_step
    shrink = gen.shrink_host_lane

    def step(*a, **k):
        marks.append(time.perf_counter())
        return real(*a, **k)

    def shrunk(engine, *a, **k):
        t = time.perf_counter()
        guard = shrink(engine, *a, **k)
        left = engine.model.host.layers if engine.model.host is not None else ()
        print(f"  [{tag}] before step {len(marks) + 1}: {'shrunk to ' + str(left) if left else 'retired'} in "
              f"{(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
        return guard

    gen.decode_step, gen.shrink_host_lane = step, shrunk
    b0 = engine.weights.stream.streamed_bytes
    try:
        gen.generate(engine, [prompt], SamplingParams(), max_new_tokens=tokens)
    finally:
        gen.decode_step, gen.shrink_host_lane = real, shrink
    torch.cuda.synchronize()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    gb = (engine.weights.stream.streamed_bytes - b0) / max(1, len(marks)) / 1e9
    print(f"[{tag}] {len(steps)} steps (ms): " + " ".join(f"{s * 1e3:.0f}" for s in steps))
    if steps:
        print(f"[{tag}] median first 8 {statistics.median(steps[:8]) * 1e3:.1f} ms, last 8 "
              f"{statistics.median(steps[-8:]) * 1e3:.1f} ms; ~{gb:.2f} GB streamed a step; graph "
              f"{'on' if engine.graph is not None else 'off'}, host lane {'on' if engine.model.host else 'off'}")
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--vram-budget", default="6GB")
    p.add_argument("--tokens", type=int, default=40)
    args = p.parse_args(argv)
    opts = EngineOptions(device="cuda", vram_budget=parse_size(args.vram_budget), batch=1, max_context=512,
                         host_compute="auto")
    engine = Engine(args.model, opts)
    plan = engine.plan
    print(f"plan: {len(plan.streamed_layers)} streamed, {len(plan.host_layers)} host layers; graph "
          f"{'on' if engine.graph is not None else 'off'}", flush=True)
    prompt = list(range(100, 112))
    timed_generation(engine, prompt, args.tokens, "auto")
    timed_generation(engine, prompt, args.tokens, "after")  # (a lane left smaller is watched again)
    engine.graph = None
    timed_generation(engine, prompt, args.tokens, "eager")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
