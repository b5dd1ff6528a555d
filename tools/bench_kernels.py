"""Benchmark the Triton kernels against their torch peers at Qwen2.5-7B shapes.

Usage:  python -m tools.bench_kernels --out bench/results/kernels.json

Main numbers are medians of CUDA-graph replays (``do_bench_cudagraph``: device
time, no launch overhead) rotating among input sets larger than L2; the
'eager' columns are ``do_bench`` medians of plain launches after an L2 flush.
Measures the ceilings in the same run (device-to-device copy bandwidth, bytes
read + written, and the bf16 GEMM rate at 8192^3) and reports every kernel's
speed ratio to its torch peer and its fraction of the ceiling.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tools.bench_attention import bench_decode_attn, bench_prefill_attn
from tools.bench_common import ROTATE_BYTES, Bench, copies, rel_err
from tools.bench_quant import bench_qlinear

# name, K, N of the Qwen2.5-7B projections (hidden 3584, intermediate 18944, vocab 152064)
QWEN7B_LINEAR = [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888),
                 ("down", 18944, 3584), ("lm_head", 3584, 152064)]
GROUPS = ("ceilings", "gemv", "gemm", "decode_attn", "prefill_attn", "elementwise", "qgemv", "qgemm", "qprefill")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the kernel benchmark."""
    p = argparse.ArgumentParser(prog="python -m tools.bench_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write results as JSON to this path")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma list of groups out of {','.join(GROUPS)}")
    p.add_argument("--batches", default="1,8,32", help="decode GEMV batch sizes")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="M of the prefill GEMM / T of attention")
    p.add_argument("--contexts", default="4096,32768", help="decode attention context lengths")
    p.add_argument("--decode-batches", default="1,8", help="decode attention batch sizes")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time per case")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per case")
    return p


def bench_ceilings(b: Bench) -> None:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = b.time_ms([lambda: dst.copy_(src)])[1]
    b.ceil["copy_GBps"] = 2 * src.numel() / t * 1e-6
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = b.time_ms([lambda: a @ c])[1]
    b.ceil["gemm_TFLOPs"] = 2 * 8192 ** 3 / t * 1e-9
    print(f"ceilings: copy {b.ceil['copy_GBps']:.0f} GB/s (read+write), "
          f"bf16 GEMM 8192^3 {b.ceil['gemm_TFLOPs']:.0f} TFLOP/s")


def bench_linear(b: Bench, group: str, batches: list[int]) -> None:
    from kernels import gemm as gemm_mod, gemv as gemv_mod
    ours_fn = gemv_mod.gemv if group == "gemv" else gemm_mod.gemm
    tuned = gemv_mod._TUNED if group == "gemv" else gemm_mod._TUNED
    if group == "gemv":
        def bucket(m: int) -> int:
            return 1 if m == 1 else max(16, 1 << (m - 1).bit_length())
    else:
        def bucket(m: int) -> int:
            return min(1 << (m - 1).bit_length(), 4096)
    for m in batches:
        for name, k, n in QWEN7B_LINEAR:
            sets = copies(lambda: (torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                                    torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5),
                           2 * n * k)
            ours = b.time_ms([lambda s=s: ours_fn(s[0], s[1]) for s in sets])
            cfg = tuned.get((bucket(m), n, k, torch.bfloat16, False))
            peer = b.time_ms([lambda s=s: F.linear(s[0], s[1]) for s in sets])
            if group == "gemv":
                work, unit = 2.0 * (n * k + m * k + m * n), "GB/s"
            else:
                work, unit = 2.0 * m * n * k, "TFLOP/s"
            err = rel_err(ours_fn(*sets[0]), F.linear(*sets[0]))
            b.add(group, name, f"M={m} K={k} N={n}", ours, peer, work, unit, cfg, err)
            del sets
            torch.cuda.empty_cache()


def _torch_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _torch_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pos: torch.Tensor) -> None:
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]
    for x in (q, k):
        x1, x2 = x[..., : x.shape[-1] // 2].float(), x[..., x.shape[-1] // 2:].float()
        x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))


def _elementwise_cases(t: int) -> list[tuple]:
    """(module, name, shape, ours, peer, bytes) for the colleague kernels that exist."""
    h, inter, hq, hk, d, bf = 3584, 18944, 28, 4, 128, torch.bfloat16
    cases = []
    x = torch.randn(t, h, device="cuda", dtype=bf)
    r = torch.randn_like(x)
    w = torch.randn(h, device="cuda", dtype=bf)
    cases.append(("rmsnorm", "rmsnorm", f"[{t}, {h}]", lambda m: m.rmsnorm(x, w, 1e-6),
                  lambda: _torch_rmsnorm(x, w, 1e-6), 2 * 2 * t * h))
    cases.append(("add_rmsnorm", "add_rmsnorm", f"[{t}, {h}]", lambda m: m.add_rmsnorm(x, r, w, 1e-6),
                  lambda: (_torch_rmsnorm(x + r, w, 1e-6), x + r), 4 * 2 * t * h))
    q = torch.randn(1, t, hq, d, device="cuda", dtype=bf)
    k = torch.randn(1, t, hk, d, device="cuda", dtype=bf)
    ang = torch.rand(t, d // 2, device="cuda") * 6.28
    cos, sin = ang.cos(), ang.sin()
    pos = torch.arange(t, device="cuda", dtype=torch.int32)[None]
    cases.append(("rope", "apply_rope_", f"q[1, {t}, {hq}, {d}] k[1, {t}, {hk}, {d}]",
                  lambda m: m.apply_rope_(q, k, cos, sin, pos),
                  lambda: _torch_rope(q, k, cos, sin, pos.long()),
                  2 * 2 * t * (hq + hk) * d + 2 * 4 * t * (d // 2)))  # q, k in and out; cos, sin rows read
    gu = torch.randn(t, 2 * inter, device="cuda", dtype=bf)
    cases.append(("swiglu", "swiglu", f"[{t}, {2 * inter}]", lambda m: m.swiglu(gu),
                  lambda: F.silu(gu[:, :inter]) * gu[:, inter:], 3 * 2 * t * inter))
    return cases


def bench_elementwise(b: Bench, t: int) -> None:
    n_sets = max(2, math.ceil(ROTATE_BYTES / (2 * 2 * t * 3584)))  # smallest case: rmsnorm
    sets = [_elementwise_cases(t) for _ in range(n_sets)]
    for i, (mod_name, name, shape, _, _, nbytes) in enumerate(sets[0]):
        try:
            mod = importlib.import_module(f"kernels.{mod_name}")
        except ImportError as exc:
            print(f"skip {mod_name}: {exc}")
            continue
        ours = b.time_ms([lambda c=c: c[i][3](mod) for c in sets])
        peer = b.time_ms([c[i][4] for c in sets])
        tuned = getattr(mod, "_TUNED", None)  # rope: (BLOCK_T, BLOCK_H, warps) chosen at first call
        cfg = str(list(tuned.values())[-1]) if tuned else None
        b.add("elementwise", name, shape, ours, peer, float(nbytes), "GB/s", config=cfg)


def print_table(rows: list[dict]) -> None:
    """Print the results; times are CUDA-graph replays, 'eager' columns plain launches."""
    head = f"{'group':<13}{'kernel':<18}{'shape':<34}{'triton us':>10}{'torch us':>10}" \
           f"{'x torch':>8}{'rate':>9}{'unit':>8}{'of ceil':>8}{'eager us':>9}{'torch eager':>12}{'err':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)
        frac = None if r["frac_of_ceiling"] is None else 100 * r["frac_of_ceiling"]
        print(f"{r['group']:<13}{r['name']:<18}{r['shape']:<34}{r['triton_us']:>10.1f}"
              f"{fmt(r['torch_us'], '.1f'):>10}{fmt(r['speedup_vs_torch'], '.2f'):>8}{r['rate']:>9.1f}"
              f"{r['unit']:>8}{fmt(frac, '.0f') + '%':>8}{r['triton_eager_us']:>9.1f}"
              f"{fmt(r['torch_eager_us'], '.1f'):>12}{fmt(r['rel_err_vs_torch'], '.1e'):>9}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmark groups; returns the process exit code."""
    args = build_parser().parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        print(f"error: unknown group(s) {unknown}; choose from {list(GROUPS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_kernels needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds")}
    print(" | ".join(f"{k}: {v}" for k, v in meta.items()))
    b = Bench(args)
    bench_ceilings(b)  # always: every ratio needs them
    t = args.prefill_tokens
    steps = {"gemv": lambda: bench_linear(b, "gemv", _ints(args.batches)),
             "gemm": lambda: bench_linear(b, "gemm", [t]),
             "decode_attn": lambda: bench_decode_attn(b, _ints(args.contexts), _ints(args.decode_batches)),
             "prefill_attn": lambda: bench_prefill_attn(b, t),
             "elementwise": lambda: bench_elementwise(b, t),
             "qgemv": lambda: bench_qlinear(b, "qgemv", _ints(args.batches)),
             "qgemm": lambda: bench_qlinear(b, "qgemm", [t]),
             "qprefill": lambda: bench_qlinear(b, "qprefill", [t])}
    for g in groups:
        if g in steps:
            steps[g]()
            torch.cuda.empty_cache()
    print_table(b.rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "ceilings": b.ceil, "results": b.rows}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
