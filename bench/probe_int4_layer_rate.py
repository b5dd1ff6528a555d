"""Probe: does the host lane's int4 rate (engine.host_int4.measure_int4_gemv: one ~128 MB matrix, K = 4096)
stand for a real layer's four projections? Issue 18: on the H200 host the planner planned the synthetic 7B
AWQ's host layers at 39.5 GB/s and the lane achieved 24.8 (bench/results/2026-12-05-h200-s37/call1/).

Prints the micro-benchmark's GB/s, then the 7B's qkv, o, gate_up and down (int4 g128) timed back to back
as one layer and each alone, batch 1, in --dtype activations (torch's CPU int4 kernel, this machine's threads),
then the whole layer as the lane runs it (engine.model.Model.layer on HostOps: norms, RoPE, KV append,
attention over --context positions, the projections). With --contend (a CUDA machine) everything is timed
again while a thread keeps pinned host-to-device copies going (memory.host_rate.h2d_traffic: what the
streamer does while the lane computes). Everything is timed on a worker set up as the lane's
(engine.host_worker.machine_pick: its cores and thread count); the copying thread runs on this one's CPUs.

    PYTHONPATH=. python bench/probe_int4_layer_rate.py [--dtype bf16] [--repeats 5] [--context 1024] [--contend] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from engine.host_int4 import int4_linear, kernel_dtype, measure_int4_gemv, random_int4, to_cpu_int4
from engine.config import ModelConfig
from engine.host_extra import decode_layer, stand_ins
from engine.host_lane import HostOps
from engine.host_worker import machine_pick, run_pinned
from memory.host_rate import h2d_traffic
from tools.bench_host_int4 import times_ms

QWEN7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True)
TENSORS = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"]
SHAPES = [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)]


def _median_s(fn, repeats: int) -> float:
    return times_ms(fn, repeats)[0] / 1e3


def _whole_layer_s(weights: list, dt: torch.dtype, context: int, repeats: int, profile: bool = False) -> float:
    """Median seconds of one decode step of the layer through Model.layer on HostOps (the lane's ops);
    ``profile``: then prints one more call's top-level torch ops by total time."""
    cfg = ModelConfig.from_dict(QWEN7B)
    w = stand_ins(cfg, dt) | {t: cw for t, (_, cw, _, _) in zip(TENSORS, weights)}  # the norms, bias and int4 weights
    step = decode_layer(cfg, HostOps(), w, dt, 1, context)
    with torch.inference_mode():  # as the lane runs its layers
        seconds = _median_s(step, repeats)
    if profile:
        _print_ops(step)
    return seconds


def _print_ops(fn) -> None:
    """One call of ``fn`` under torch's profiler: its top-level ops by total CPU time, and their sum."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # no CUDA activity
        fn()
    calls: dict[str, list] = {}
    for e in prof.events():
        if e.cpu_parent is None:
            calls.setdefault(e.name, []).append(e.cpu_time_total / 1e3)
    rows = sorted(calls.items(), key=lambda kv: -sum(kv[1]))
    print(f"  one call's {sum(len(v) for v in calls.values())} top-level ops: "
          f"{sum(map(sum, calls.values())):.3f} ms in them")
    for name, ms in rows[:12]:
        print(f"    {name:40} {len(ms):4} calls {sum(ms):8.3f} ms")


def _report(weights: list, dt: torch.dtype, a: argparse.Namespace) -> None:
    print(f"micro-benchmark (memory.host_rate's int4 rate): {measure_int4_gemv(1, dt, repeats=a.repeats):.2f} GB/s")
    total = sum(b for *_, b in weights)
    layer_s = _median_s(lambda: [int4_linear(x, w) for _, w, x, _ in weights], a.repeats)
    print(f"the 7B's layer, four projections back to back: {total / layer_s / 1e9:.2f} GB/s ({layer_s * 1e3:.2f} ms)")
    for name, w, x, nbytes in weights:
        s = _median_s(lambda w=w, x=x: int4_linear(x, w), a.repeats)
        print(f"  {name:8} {nbytes / s / 1e9:6.2f} GB/s ({s * 1e3:.2f} ms)")
    whole = _whole_layer_s(weights, dt, a.context, a.repeats, a.profile)
    print(f"the whole layer as the lane runs it (context {a.context}): {total / whole / 1e9:.2f} GB/s "
          f"({whole * 1e3:.2f} ms, {(whole - layer_s) * 1e3:.2f} ms beyond the projections)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--context", type=int, default=1024, help="positions the attention reads (default: %(default)s)")
    p.add_argument("--contend", action="store_true", help="also time it all next to host-to-device copies (CUDA)")
    p.add_argument("--profile", action="store_true", help="print the whole layer's top-level torch ops")
    a = p.parse_args()
    if a.contend and not torch.cuda.is_available():
        p.error("--contend needs a CUDA device (it keeps host-to-device copies going)")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    pick = machine_pick(disk_tier=False)  # the host lane's cores and thread count (engine.host_worker)
    print(f"torch {torch.__version__}, {a.dtype} activations, batch 1; {pick.describe()}")
    weights = []
    for name, n, k in SHAPES:
        w = to_cpu_int4(random_int4(n, k, 128), kernel_dtype(dt))
        weights.append((name, w, torch.randn(1, k).to(dt), n * (k // 2 + 4 * (k // 128))))
    for contend in (False, True) if a.contend else (False,):
        print("-- next to host-to-device copies" if contend else "-- alone")
        with h2d_traffic(torch.device("cuda")) if contend else contextlib.nullcontext():  # from this thread's CPUs
            run_pinned(pick, _report, weights, dt, a)


if __name__ == "__main__":
    main()
