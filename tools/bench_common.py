"""Timing helpers shared by the kernel benchmarks (tools/bench_kernels.py, tools/bench_attention.py)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

ROTATE_BYTES = 256 << 20  # keep at least this many bytes of rotating inputs (L2 is 50-60 MB)


class Bench:
    """Timing helper holding the flags, the ceilings and the result rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        import triton.testing
        self.do_bench = triton.testing.do_bench
        self.do_bench_graph = triton.testing.do_bench_cudagraph
        self.args = args
        self.ceil: dict[str, float] = {}
        self.rows: list[dict] = []

    def time_ms(self, fns: list[Callable[[], object]]) -> tuple[float, float | None]:
        """(graph, eager) median ms of one call, cycling through ``fns`` (one per input set)."""
        state = {"i": 0}

        def step() -> None:
            fns[state["i"] % len(fns)]()
            state["i"] += 1

        for fn in fns:  # compile / autotune outside the timing
            fn()
        torch.cuda.synchronize()
        eager = self.do_bench(step, warmup=self.args.warmup_ms, rep=self.args.rep_ms, return_mode="median")
        try:
            graph = self.do_bench_graph(step, rep=max(10, self.args.rep_ms // 5), return_mode="median")
        except Exception as exc:  # noqa: BLE001 - report and fall back to eager timing
            print(f"  (cuda graph timing failed: {type(exc).__name__}: {exc}; using eager)")
            graph = None
        return (eager if graph is None else graph), eager

    def add(self, group: str, name: str, shape: str, ours: tuple, peer: tuple | None,
            work: float, unit: str, config: object = None, err: float | None = None) -> None:
        """Record one case: (graph, eager) times in ms, ``work`` in bytes or flops."""
        scale = 1e-6 if unit == "GB/s" else 1e-9
        t, t_peer = ours[0], None if peer is None else peer[0]
        rate = work / t * scale
        ceiling = self.ceil.get("copy_GBps" if unit == "GB/s" else "gemm_TFLOPs")
        self.rows.append({
            "group": group, "name": name, "shape": shape, "triton_us": t * 1e3,
            "torch_us": None if t_peer is None else t_peer * 1e3,
            "speedup_vs_torch": None if t_peer is None else t_peer / t,
            "rate": rate, "unit": unit,
            "torch_rate": None if t_peer is None else work / t_peer * scale,
            "frac_of_ceiling": None if not ceiling else rate / ceiling,
            "triton_eager_us": ours[1] * 1e3,
            "torch_eager_us": None if peer is None else peer[1] * 1e3,
            "config": None if config is None else str(config), "rel_err_vs_torch": err,
        })


def rel_err(ours: object, peer: object) -> float:
    """‖ours − peer‖ / ‖peer‖ in fp32: a sanity check of the tuned configs."""
    a, b = (ours[0] if isinstance(ours, tuple) else ours), (peer[0] if isinstance(peer, tuple) else peer)
    return ((a.float() - b.float().reshape(a.shape)).norm() / b.float().norm()).item()


def copies(make: Callable[[], tuple], nbytes: int) -> list[tuple]:
    """Enough independent input sets that together they exceed ROTATE_BYTES."""
    n = max(2, min(16, math.ceil(ROTATE_BYTES / max(nbytes, 1))))
    return [make() for _ in range(n)]
