"""Long-prompt prefill against one streamed pass and the all-resident prefill (issue 14's benchmark).

    python -m tools.bench_prefill --model DIR --budgets 6GiB,4GiB,full --tokens 2048,8192,16384,32768

For each budget one engine (context = the longest prompt + 1) prefills each prompt length, warm
(every shape run once first), timed with a device sync (the median of ``--reps`` runs). Beside each
time: the bytes the streamer handed out during one run (layer-major: one pass per prompt), whether its
prompt states were parked in the KV cache (engine.state_parking), one streamed pass at the pinned
host-to-device rate measured in the same run, the all-resident prefill of the same length, and
their ratio. ``--chunk-major`` also times the order before layer-major (the whole model per chunk)
at the second length, for comparison. Writes one JSON file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.engine import Engine, EngineOptions
from engine.generate import prefill
from memory.bandwidth import measure_h2d
from memory.units import format_size, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (e.g. from tools.synth)")
    p.add_argument("--budgets", default="6GiB,4GiB,full", help="comma list of VRAM budgets; 'full' = no limit")
    p.add_argument("--tokens", default="2048,8192,16384,32768", help="comma list of prompt lengths")
    p.add_argument("--chunk-major", action="store_true", help="also time the chunk-major order once per budget")
    p.add_argument("--prefill-states", default="auto", choices=["auto", "vram", "host"],
                   help="where the prompt states wait between layers (the planner's choice with auto)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per length (the median is reported)")
    p.add_argument("--out", default="bench/results/prefill.json")
    return p


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _chunk_major(engine: Engine, ids: list[int]) -> None:
    """The order before layer-major: the whole model once per chunk of --prefill-chunk tokens."""
    dev, chunk = engine.device, engine.opts.prefill_chunk
    engine.cache.reset()
    for c0 in range(0, len(ids), chunk):
        c1 = min(len(ids), c0 + chunk)
        x = torch.tensor([ids[c0:c1]], device=dev)
        with engine.ops.prompt_chunk(c1 - c0):
            engine.model.forward(x, torch.tensor([c0], dtype=torch.int32, device=dev),
                                 torch.tensor([c1 - c0], dtype=torch.int32, device=dev), engine.cache, max_len=c1)


def run_budget(model: str, budget: int | None, lengths: list[int], chunk_major: bool, h2d: float,
               states: str = "auto", reps: int = 1) -> dict:
    opts = EngineOptions(device="cuda", kernels="triton", vram_budget=budget, max_context=max(lengths) + 1,
                         prefill_states=states)
    engine = Engine(model, opts)
    plan, stream = engine.plan, engine.weights.stream
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(0, min(engine.cfg.vocab_size, 1000), (n,), generator=gen).tolist()
        prefill(engine, [ids])  # warm: compile and tune this length's shapes
        before, parked = stream.streamed_bytes, engine.model.parked_passes
        times = [_timed(lambda: prefill(engine, [ids])) for _ in range(max(1, reps))]
        t = statistics.median(times)
        rows.append({"tokens": n, "prefill_s": t, "tok_s": n / t, "times_s": times,
                     "streamed_bytes": (stream.streamed_bytes - before) // len(times),
                     "states_parked": engine.model.parked_passes > parked})
        where = " (states parked in the KV cache)" if rows[-1]["states_parked"] else ""
        print(f"  {n:>6} tokens: {t:.3f} s median of {len(times)} ({n / t:,.0f} tok/s), streamed "
              f"{format_size(rows[-1]['streamed_bytes'])}{where}", flush=True)
    res = {"budget_bytes": budget, "resident_layers": len(plan.resident_layers),
           "streamed_bytes_per_step": plan.streamed_bytes_per_step, "one_pass_s": plan.streamed_bytes_per_step / (h2d * 1e9),
           "prefill_state_bytes": plan.prefill_state_bytes, "prefill_state_place": plan.prefill_state_place,
           "total_planned_bytes": plan.total_bytes, "rows": rows}
    if chunk_major and plan.streamed_layers:
        ids = torch.randint(0, min(engine.cfg.vocab_size, 1000), (lengths[1],), generator=gen).tolist()
        _chunk_major(engine, ids)
        before = stream.streamed_bytes
        t = _timed(lambda: _chunk_major(engine, ids))
        res["chunk_major"] = {"tokens": lengths[1], "prefill_s": t, "streamed_bytes": stream.streamed_bytes - before}
        print(f"  chunk-major {lengths[1]} tokens: {t:.3f} s, streamed {format_size(stream.streamed_bytes - before)}")
    res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    engine.close()
    del engine, plan, stream
    gc.collect()  # the next budget's engine plans and caps with what this one leaves allocated
    torch.cuda.empty_cache()
    res["left_allocated_bytes"] = torch.cuda.memory_allocated()
    if res["left_allocated_bytes"] > 64 << 20:
        print(f"  note: {format_size(res['left_allocated_bytes'])} still allocated after the engine closed", flush=True)
    torch.cuda.reset_peak_memory_stats()
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_prefill needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    budgets = [None if b.strip() == "full" else parse_size(b) for b in args.budgets.split(",")]
    lengths = [int(t) for t in args.tokens.split(",")]
    h2d = measure_h2d(torch.device("cuda"))
    print(f"pinned H2D {h2d:.1f} GB/s | {torch.cuda.get_device_name()}")
    results = []
    for b in budgets:
        print(f"budget {format_size(b) if b else 'full'}:", flush=True)
        results.append(run_budget(args.model, b, lengths, args.chunk_major, h2d, args.prefill_states, args.reps))
    full = next((r for r in results if r["budget_bytes"] is None), None)
    for r in results:
        for row in r["rows"]:
            ref = next((x["prefill_s"] for x in full["rows"] if x["tokens"] == row["tokens"]), 0.0) if full else 0.0
            row["over_bound"] = row["prefill_s"] / max(r["one_pass_s"], ref) if max(r["one_pass_s"], ref) else None
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "h2d_gbps": h2d,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "model": args.model}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for r in results:
        ratios = ", ".join(f"{x['tokens']}: {x['over_bound']:.2f}" for x in r["rows"] if x["over_bound"])
        print(f"{format_size(r['budget_bytes']) if r['budget_bytes'] else 'full'}: prefill / max(one pass, "
              f"all resident) = {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
