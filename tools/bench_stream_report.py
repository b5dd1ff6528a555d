"""Second half of ``tools.bench_stream``: the accelerate peer, checks, JSON, timeline PNG (last two decode
steps and a traced prefill of the first traced configuration, copy above compute per layer), table."""

from __future__ import annotations

import json
import os
import time
from datetime import date
from pathlib import Path

import torch

from memory.units import format_size
from tools.hf_offload import gpu_modules, load_offloaded
from tools.timeline_render import save_timeline
from tools.timeline_spans import decode_phase, prefill_phase


def accelerate_decode(model: str, budget: int, tokens: int = 6, prompt_len: int = 16) -> dict:
    """HF accelerate offload (device_map="auto", max_memory = budget) greedy decode tok/s at batch 1."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        m, load_s = load_offloaded(model, budget, torch.bfloat16)
    except ImportError as e:
        return {"error": f"not importable: {e}"}
    ids = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0)).cuda()

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(1)
    t1, tn = timed(1), timed(tokens)
    res = {"load_s": load_s, "decode_tok_s": (tokens - 1) / (tn - t1), "tokens": tokens,
           "peak_vram_bytes": torch.cuda.max_memory_allocated(),
           "gpu_modules": gpu_modules(m)}
    del m
    torch.cuda.empty_cache()
    return res


def _check_tokens(results: list[dict]) -> None:
    full = {r["batch"]: r["tokens"] for r in results if r["budget_bytes"] is None and not r.get("host_budget")}
    for r in results:
        ref = full.get(r["batch"])
        r["tokens_match_all_resident"] = None if ref is None else r["tokens"] == ref


def finish(args, results: list[dict], h2d: float, cfg, out_dir: Path) -> int:
    """Peer runs, equality checks, files, and the closing table; returns the exit code."""
    _check_tokens(results)
    peers = {}
    if args.accelerate:
        for budget in sorted({r["budget_bytes"] for r in results if r["budget_bytes"]}):
            peers[budget] = accelerate_decode(args.model, budget)
            print(f"accelerate offload at {format_size(budget)}: {peers[budget]}", flush=True)
    for r in results:
        peer = peers.get(r["budget_bytes"])
        if peer and "decode_tok_s" in peer and r["batch"] == 1:
            r["speedup_vs_accelerate"] = r["tok_s"] / peer["decode_tok_s"]
    streamed = [r for r in results if r.get("spans")]
    if streamed:  # the first traced configuration: its last two decode steps and its traced prefill
        r = streamed[0]
        pre = prefill_phase(r["prefill_spans"]) if r.get("prefill_spans") else None
        save_timeline([decode_phase(r["spans"]), pre], out_dir / f"{args.tag}-timeline.png",
                      f"{Path(args.model).name} at {format_size(r['budget_bytes'] or 0)}, batch {r['batch']}: "
                      f"{r['resident_layers']} resident / {r['streamed_layers']} streamed layers; copy vs compute")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": date.today().isoformat(),
            "model": str(args.model), "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
            "h2d_pinned_gbps": h2d, "gemm_tflops": args.gemm_tflops, "kernels": args.kernels,
            "checkpoint_read_gbps_cold": args.disk_gbps, "host": getattr(args, "host_info", None)}
    for r in results:
        r.pop("spans", None)
        r.pop("prefill_spans", None)
    payload = {"meta": meta, "results": results,
               "accelerate": {str(k): v for k, v in peers.items()}}
    path = out_dir / f"{args.tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | "
          f"pinned H2D {h2d:.1f} GB/s")
    print(f"{'budget':>12} {'batch':>5} {'step ms':>8} {'bound ms':>8} {'ratio':>6} {'tok/s':>8} "
          f"{'GB/s':>6} {'copy busy':>9} {'vs accel':>8} {'same tokens':>11} {'peak':>10} {'reserved':>10}")
    for r in results:
        b = format_size(r["budget_bytes"]) if r["budget_bytes"] else "full"
        ratio = f"{r['step_over_bound']:.3f}" if r["step_over_bound"] else "-"
        busy = f"{r['copy_busy_fraction']:.2f}" if r["copy_busy_fraction"] is not None else "-"
        acc = f"{r['speedup_vs_accelerate']:.1f}x" if r.get("speedup_vs_accelerate") else "-"
        print(f"{b:>12} {r['batch']:>5} {r['step_s'] * 1e3:>8.1f} {r['bound_s'] * 1e3:>8.1f} {ratio:>6} "
              f"{r['tok_s']:>8.2f} {r['achieved_gbps']:>6.1f} {busy:>9} {acc:>8} "
              f"{str(r['tokens_match_all_resident']):>11} {format_size(r['peak_vram_bytes']):>10} "
              f"{format_size(r.get('peak_reserved_bytes', 0)):>10}")
        if "prefill_s" in r:
            print(f"{'':>12} prefill {args.prefill_tokens} tok: {r['prefill_s'] * 1e3:.0f} ms = "
                  f"{r['prefill_over_bound']:.2f}x max(transfer {r['prefill_transfer_bound_s'] * 1e3:.0f} ms, "
                  f"compute {r['prefill_compute_bound_s'] * 1e3:.0f} ms)")
    print(f"wrote {path}")
    return 0
