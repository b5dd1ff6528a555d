"""Streaming-overlap benchmark: decode and prefill at several VRAM budgets, against the bound.

For one model it measures, in one run: pinned host-to-device bandwidth; per budget and
batch the plan (resident layers, bytes streamed per step), decode step time against
the bound (streamed bytes / measured bandwidth), achieved GB/s, copy-engine busy
fraction, compute-stream stall, 2048-token prefill time, peak VRAM, and whether the
tokens equal the all-resident run; and (when importable) Hugging Face accelerate
offload at the same budget. Writes JSON, a Perfetto trace and a PNG timeline.

``--host-compute off,auto`` runs every configuration once per mode: with a host lane (``engine.host_lane``)
the results also hold the host layers, each lane's predicted time, the host lane's measured time per
step and GB/s, its busy fraction, and the step against the planner's prediction.

    python -m tools.bench_stream --model DIR --budgets 6GiB,full --batches 1,16 --out-dir bench/results
    python -m tools.bench_stream --model DIR --budgets 6GiB,4GiB --batches 1,4 --host-compute off,auto
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.engine import Engine, EngineOptions, open_model
from engine.generate import decode_step, prefill
from engine.layout import expected_tensors
from memory.bandwidth import disk_read_bandwidth, measure_h2d
from memory.host_lane import parse_host_compute
from memory.host_rate import cpu_name
from memory.units import format_size, parse_size
from streamer.trace import busy_fraction, write_chrome_trace
from tools.memreport_measure import traced_prefill


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (e.g. from tools.synth)")
    p.add_argument("--budgets", default="6GiB,full", help="comma list of VRAM budgets; 'full' = no limit")
    p.add_argument("--batches", default="1", help="comma list of batch sizes")
    p.add_argument("--context", type=int, default=4096, help="KV-cache context for batch 1")
    p.add_argument("--batch-context", type=int, default=1024, help="KV-cache context for batch > 1")
    p.add_argument("--steps", type=int, default=12, help="decode steps timed per configuration")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--kernels", default="triton", choices=["triton", "torch"])
    p.add_argument("--accelerate", action="store_true", help="also run HF accelerate offload at each budget")
    p.add_argument("--disk-host-budget", help="also run the first budget at batch 1 with this host budget, so "
                   "part of the streamed layers is read from the checkpoint file (disk tier)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="round a bf16/fp16 checkpoint's layers at load "
                   "(quantized checkpoints, e.g. tools.synth --quant awq, are detected without it)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default="stream")
    p.add_argument("--host-compute", default="off", type=_host_modes, metavar="MODES",
                   help="comma list of --host-compute modes (auto, off, N) to run each configuration with")
    return p


def _host_modes(text: str) -> list:
    try:
        return [parse_host_compute(m) for m in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _host_fields(engine: Engine, step: float, steps: int, spans: list[dict], window: float) -> dict:
    """The host lane's plan and what it achieved over the ``steps`` timed decode steps."""
    plan, host = engine.plan, engine.model.host
    lane = plan.host_lane
    out = {"host_compute": engine.opts.host_compute, "host_layers": list(plan.host_layers),
           "predicted_step_s": plan.predicted_step_s, "step_over_predicted": step / plan.predicted_step_s}
    if lane is None:
        return out
    out.update(host_gbps_planned=lane.host_gbps, host_source=lane.host_source, predicted_copy_s=lane.copy_s,
               predicted_host_s=lane.host_s, predicted_gpu_s=lane.gpu_s)
    if host is not None and host.seconds > 0:
        out.update(host_s_per_step=host.seconds / steps,
                   host_gbps_achieved=len(host.layers) * host.layer_bytes * steps / host.seconds / 1e9,
                   # the bytes the CPU read per host layer (widened layers: their widened copy; the plan's
                   # host_gbps_planned is over the packed bytes, engine.host_forms) and the form
                   host_layer_read_bytes=host.layer_bytes, host_weight_form=host.weight_form,
                   host_busy_fraction=busy_fraction(spans, "host", window) if spans else None,
                   host_worker=host.describe())  # the cores and torch threads the host layers ran on
    return out


def _decode_steps(engine: Engine, batch: int, steps: int, prompt_len: int = 16) -> tuple[list[float], list]:
    """Greedy decode ``steps`` tokens from a fixed prompt; per-step wall times and the tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(engine.cfg.vocab_size, 1000), (prompt_len,), generator=g).tolist()] * batch
    dev = engine.device
    engine.cache.reset()
    logits = prefill(engine, prompts)
    tok = logits.argmax(-1)
    times, tokens = [], [tok.tolist()]
    pos = prompt_len
    if engine.weights.stream.tracer:
        engine.weights.stream.tracer.mark()
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(steps):
        # no device-wide sync inside the loop: it would drain the copy stream, which is already
        # prefetching the next step's layers, and hide that time from the step being measured
        logits = decode_step(engine, tok, [pos] * batch)
        tok = logits.argmax(-1)
        tokens.append(tok.tolist())  # waits for the compute stream only, as generation does
        now = time.perf_counter()
        times.append(now - t)
        t = now
        pos += 1
    return times, tokens


def _prefill_time(engine: Engine, n: int) -> tuple[float, list[dict]]:
    """Seconds of a warm ``n``-token prefill, and (when tracing) the spans of one more, traced prefill."""
    ids = [list(range(1, n + 1))]
    engine.cache.reset()
    prefill(engine, ids)  # warm (autotune, allocator)
    torch.cuda.synchronize(engine.device)
    t = time.perf_counter()
    prefill(engine, ids)
    torch.cuda.synchronize(engine.device)
    took = time.perf_counter() - t
    tracer = engine.weights.stream.tracer
    if tracer is None:
        return took, []
    engine.cache.reset()
    return took, traced_prefill(engine, ids, tracer)[1]


def _stall_ms(spans: list[dict]) -> float:
    """Time the compute stream sat waiting on a copy: gaps before compute spans of streamed units."""
    comp = sorted((s for s in spans if s["lane"] == "compute"), key=lambda s: s["start_ms"])
    return sum(max(0.0, b["start_ms"] - a["end_ms"]) for a, b in zip(comp, comp[1:]))


def run_config(model: str, budget: int | None, batch: int, args, h2d: float, flops_per_token: float,
               out_dir: Path, host_budget: int | None = None, host_compute="off") -> dict:
    ctx = args.context if batch == 1 else args.batch_context
    opts = EngineOptions(device="cuda", kernels=args.kernels, vram_budget=budget, batch=batch, max_context=ctx,
                         host_budget=host_budget, trace=True, quantize=args.quantize, host_compute=host_compute)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine(model, opts)
    load_s = time.perf_counter() - t0
    plan = engine.plan
    _decode_steps(engine, batch, 2)  # warm-up: autotune, allocator, pipeline
    if engine.model.host is not None:
        engine.model.host.reset_timing()  # time the host lane over the measured steps only
    times, tokens = _decode_steps(engine, batch, args.steps)
    spans = engine.weights.stream.tracer.timeline() if engine.weights.stream.tracer else []
    step = statistics.median(times[1:]) if len(times) > 2 else times[-1]
    bound = plan.streamed_bytes_per_step / (h2d * 1e9)
    window = spans[-1]["end_ms"] - spans[0]["start_ms"] if spans else 0.0
    res = {"budget_bytes": budget, "batch": batch, "context": ctx, "load_s": load_s, "host_budget": host_budget,
           "disk_layers": len(plan.disk_layers), "disk_gbps_achieved": plan.disk_bytes_per_step / step / 1e9,
           "resident_layers": len(plan.resident_layers), "streamed_layers": len(plan.streamed_layers),
           "lm_head_resident": plan.lm_head_resident, "embed_on_device": plan.embed_on_device,
           "streamed_bytes_per_step": plan.streamed_bytes_per_step, "num_slots": plan.num_slots,
           "step_s": step, "step_s_all": times, "bound_s": bound,
           "step_over_bound": step / bound if plan.streamed_layers or not plan.lm_head_resident else None,
           "achieved_gbps": plan.streamed_bytes_per_step / step / 1e9, "tok_s": batch / step,
           "predicted_tok_s": plan.predicted_tok_s,
           "copy_busy_fraction": busy_fraction(spans, "copy", window) if spans else None,
           "compute_stall_ms_total": _stall_ms(spans) if spans else None, "traced_window_ms": window,
           "tokens": tokens, **_host_fields(engine, step, args.steps, spans, window)}
    if args.prefill_tokens and batch == 1:
        pre, res["prefill_spans"] = _prefill_time(engine, args.prefill_tokens)
        compute_bound = flops_per_token * args.prefill_tokens / (args.gemm_tflops * 1e12)
        res.update(prefill_s=pre, prefill_transfer_bound_s=bound, prefill_compute_bound_s=compute_bound,
                   prefill_over_bound=pre / max(bound, compute_bound))
    res["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    res["within_budget"] = budget is None or res["peak_vram_bytes"] <= budget
    # what the process holds from the driver (allocated + the allocator's cache): also the budget's
    res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    res["reserved_within_budget"] = budget is None or res["peak_reserved_bytes"] <= budget
    if spans:
        host = "" if host_compute == "off" else f"-host{host_compute}"
        name = trace_name(f"{args.tag}-trace-b{batch}-{format_size(budget or 0).replace(' ', '')}{host}",
                          args.traces_written)
        write_chrome_trace(spans, out_dir / name)
        res["trace_file"] = name
        res["spans"] = spans
    engine.close()
    del engine
    gc.collect()  # the engine holds reference cycles: free its VRAM before the next configuration
    return res


def trace_name(base: str, written: set[str]) -> str:
    """``base``.json, or ``base``-2.json, -3, ... when this run wrote it already (--host-compute off,auto,auto);
    the name is added to ``written``."""
    name, k = f"{base}.json", 1
    while name in written:
        k += 1
        name = f"{base}-{k}.json"
    written.add(name)
    return name


def _gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t) / 1e12


def checkpoint_files(model: Path) -> list[Path]:
    """The files the weights are read from: a GGUF file (or a directory's .gguf files), else the
    directory's safetensors shards."""
    if model.is_file():
        return [model]
    found = sorted(model.glob("*.safetensors")) or sorted(model.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"{model} holds no .safetensors or .gguf file: pass a model directory or a GGUF file")
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.traces_written = set()  # trace files this run wrote (a repeated configuration gets its own)
    if not torch.cuda.is_available():
        print("error: bench_stream needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = [None if b.strip() == "full" else parse_size(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    h2d = measure_h2d(torch.device("cuda"))
    args.gemm_tflops = _gemm_tflops()
    try:
        cfg = open_model(args.model).cfg  # a model directory or a GGUF file
        files = checkpoint_files(Path(args.model))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sum(math.prod(shape) for shape in expected_tensors(cfg).values())  # logical: packed codes count once each
    flops_per_token = 2 * params  # one multiply-add per weight per token
    args.disk_gbps = disk_read_bandwidth(files[0], 2 << 30)
    print(f"pinned H2D {h2d:.1f} GB/s | bf16 GEMM {args.gemm_tflops:.0f} TFLOP/s | checkpoint read "
          f"{args.disk_gbps:.2f} GB/s (page cache dropped first) | {torch.cuda.get_device_name()}")
    # the host lane's win depends on the host: its CPU and cores here, its GEMV GB/s in each plan
    args.host_info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print(f"host: {args.host_info['cpu']}, {args.host_info['cores']} logical cores, "
          f"{args.host_info['torch_threads']} torch threads")
    results = []
    if args.disk_host_budget:
        r = run_config(args.model, budgets[0], 1, args, h2d, flops_per_token, out_dir, parse_size(args.disk_host_budget))
        results.append(r)
        print(_row(r) + f" | disk tier: {r['disk_layers']} layers, {r['disk_gbps_achieved']:.2f} GB/s", flush=True)
    for batch in batches:
        for budget in budgets:
            for mode in args.host_compute:
                r = run_config(args.model, budget, batch, args, h2d, flops_per_token, out_dir, host_compute=mode)
                results.append(r)
                print(_row(r), flush=True)
    from tools.bench_stream_report import finish
    return finish(args, results, h2d, cfg, out_dir)


def _row(r: dict) -> str:
    b = format_size(r["budget_bytes"]) if r["budget_bytes"] else "full"
    ratio = f"{r['step_over_bound']:.3f}x bound" if r["step_over_bound"] else "no streaming"
    return (f"budget {b:>10} batch {r['batch']:>2}: {r['resident_layers']} resident, "
            f"{r['streamed_bytes_per_step'] / 1e9:.2f} GB/step, step {r['step_s'] * 1e3:.1f} ms ({ratio}), "
            f"{r['tok_s']:.2f} tok/s, {r['achieved_gbps']:.1f} GB/s, peak {format_size(r['peak_vram_bytes'])} "
            f"(reserved {format_size(r['peak_reserved_bytes'])})"
            + (f" | host lane: {len(r['host_layers'])} layers, {r.get('host_s_per_step', 0) * 1e3:.1f} ms/step, "
               f"{r.get('host_gbps_achieved') or 0:.1f} GB/s; step {r['step_over_predicted']:.2f}x predicted"
               if r.get("host_layers") else ""))


if __name__ == "__main__":
    sys.exit(main())
