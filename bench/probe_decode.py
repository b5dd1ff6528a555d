"""Device probe behind the session-3 kernel changes (bench/results/2026-11-22-h100-run7/probe_*.json).

Usage on the GPU machine:  python bench/probe_decode.py MODES   (JSON to $OUT/probe.json)
  g  GEMV at the 7B attention shapes: the tuner's pick, timed on rotating weights, against
     every candidate's rotating time and cuBLAS (by family: ticket / two-kernel split-K / no split)
  f  floors at batch 1, 4k: an empty kernel, read-only kernels over the KV bytes, a 4.2 MB copy
  a  decode attention at 4k: every (splits, tile, merge) incl. pass 1 alone
  t  decode attention as tuned (B=1 4k, B=8 4k, B=1 32k) and the fused merge's best per split
  s  tuner stability: three fresh tunings of the qkv GEMV (batch 8) and 4k decode attention
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from kernels import attention_decode as ad  # noqa: E402
from kernels import gemv as gv  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
RES: dict = {}


def graph_time(fns, calls=40, reps=20):
    """Per-call ms replaying a graph that cycles through fns."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        g.capture_begin()
        for i in range(calls):
            fns[i % len(fns)]()
        g.capture_end()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / calls)
    del g
    torch.cuda.empty_cache()
    ts.sort()
    return ts[len(ts) // 2]


@triton.jit
def _empty_kernel(p):
    if tl.program_id(0) == 0:
        tl.store(p, 1.0)


@triton.jit
def _read_kernel(k_ptr, v_ptr, out_ptr, n_per, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    base = pid.to(tl.int64) * n_per
    for i in range(0, n_per, BLOCK):
        acc += tl.load(k_ptr + base + i + offs).to(tl.float32)
        acc += tl.load(v_ptr + base + i + offs).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def floors(sets):
    r = {}
    buf = torch.zeros(1024, device="cuda")
    r["empty_kernel_us"] = graph_time([lambda: _empty_kernel[(1,)](buf)]) * 1e3
    r["empty_kernel_264ctas_us"] = graph_time([lambda: _empty_kernel[(264,)](buf)]) * 1e3
    n = sets[0][1].numel()
    for P in (256, 512, 1024, 2048):
        for BLOCK, w in ((1024, 4), (2048, 4), (4096, 8)):
            if n % (P * BLOCK):
                continue
            out = torch.empty(P, device="cuda")
            fns = [lambda s=s: _read_kernel[(P,)](s[1], s[2], out, n // P, BLOCK=BLOCK, num_warps=w)
                   for s in sets]
            r[f"read P={P} B={BLOCK} w={w}"] = graph_time(fns) * 1e3
    dst = torch.empty_like(sets[0][1])
    r["copy_k_us(4.2MB r+w)"] = graph_time([lambda s=s: dst.copy_(s[1]) for s in sets]) * 1e3
    return r


class _NoReduce:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def attn(sets, ctx):
    r = {}
    sc = 128 ** -0.5
    out = torch.empty_like(sets[0][0])
    seq = sets[0][3]
    shapes = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3),
              (128, 4, 2), (128, 8, 2), (128, 8, 3), (256, 8, 2)]
    splits_list = [4, 8, 12, 16, 24, 32, 48, 64, 66, 96, 132]
    real_reduce = ad._attention_decode_reduce_kernel
    for splits in splits_list:
        for bn, w, st in shapes:
            if triton.cdiv(ctx, splits) < bn // 2:
                continue
            base = triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
            for mode in ("two", "fused", "pass1"):
                cfg = ad._with_fused(base, mode == "fused")
                try:
                    if mode == "pass1":
                        ad._attention_decode_reduce_kernel = _NoReduce()
                    fns = [lambda s=s: ad._launch(s[0], s[1], s[2], seq, sc, splits, cfg, out) for s in sets]
                    t = graph_time(fns) * 1e3
                except Exception as e:  # noqa: BLE001
                    t = f"{type(e).__name__}"
                finally:
                    ad._attention_decode_reduce_kernel = real_reduce
                r[f"s={splits} bn={bn} w={w} st={st} {mode}"] = t
    import torch.nn.functional as F
    r["sdpa"] = graph_time([lambda s=s: F.scaled_dot_product_attention(
        s[0][:, :, None], s[1], s[2], scale=sc, enable_gqa=True) for s in sets]) * 1e3
    # correctness of the best fused/two
    ref = ad.attention_decode_ref(*sets[0], sc)
    for mode in (True, False):
        o = ad.attention_decode(*sets[0], sc, num_splits=16, fused=mode)
        r[f"err fused={mode}"] = ((o.float() - ref).norm() / ref.norm()).item()
    return r


def make_sets(B, ctx, n=16):
    return [(torch.randn(B, 28, 128, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, 4, ctx, 128, device="cuda", dtype=torch.bfloat16),
             torch.randn(B, 4, ctx, 128, device="cuda", dtype=torch.bfloat16),
             torch.full((B,), ctx, device="cuda", dtype=torch.int32)) for _ in range(n)]


_CUB = {}


def cub_pre(xs, ws):
    key = (xs[0].shape, ws[0].shape)
    if key not in _CUB:
        _CUB[key] = graph_time([lambda i=i: torch.nn.functional.linear(xs[i], ws[i]) for i in range(8)]) * 1e3
    return _CUB[key]


def gemv_probe():
    r = {}
    for M, K, N in ((8, 3584, 4608), (8, 3584, 3584), (32, 3584, 4608), (32, 3584, 3584), (1, 3584, 4608),
                    (1, 3584, 3584), (8, 18944, 3584)):
        block_m = 1 if M == 1 else max(16, triton.next_power_of_2(M))
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for _ in range(8)]
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        picks = []
        for rep in range(2):
            gv._TUNED.clear()
            gv.gemv(xs[0], ws[0])
            c = list(gv._TUNED.values())[0]
            picks.append((c, graph_time([lambda i=i: gv._launch(c, xs[i], ws[i], None, out, block_m)
                                         for i in range(8)]) * 1e3))
        extra = [(32, 256, 4, 3), (32, 128, 4, 4), (32, 512, 4, 2)] if block_m > 1 else []
        saved = gv._SWAP_SHAPES
        gv._SWAP_SHAPES = saved + extra
        cands = gv._candidates(block_m, N, K, 2, 132)
        gv._SWAP_SHAPES = saved
        rot = []
        for c in cands:
            try:
                rot.append((graph_time([lambda i=i: gv._launch(c, xs[i], ws[i], None, out, block_m)
                                        for i in range(8)]) * 1e3, c))
            except Exception:  # noqa: BLE001
                pass
        best = min(rot, key=lambda x: x[0])
        for tag, sel in (("ticket", lambda c: c.kwargs.get("TICKET")),
                         ("2kern-sk", lambda c: c.kwargs["SPLIT_K"] > 1 and not c.kwargs.get("TICKET")),
                         ("sk1", lambda c: c.kwargs["SPLIT_K"] == 1),
                         ("bn32swap", lambda c: c.kwargs["SWAP_AB"] and c.kwargs["BLOCK_N"] == 32)):
            sub = [x for x in rot if sel(x[1])]
            if sub:
                b_ = min(sub, key=lambda x: x[0])
                print(f"   {tag}: {b_[0]:.2f} ({cub_pre(xs, ws) / b_[0]:.3f}x) {b_[1].kwargs} w{b_[1].num_warps} s{b_[1].num_stages}")
        cub = graph_time([lambda i=i: torch.nn.functional.linear(xs[i], ws[i]) for i in range(8)]) * 1e3
        r[f"M={M} N={N} K={K}"] = {"cublas": cub, "picks": [(str(c), t) for c, t in picks],
                                   "best": (str(best[1]), best[0])}
        print(f"gemv M={M} N={N} K={K}: cublas {cub:.2f} | tuner picks " +
              ", ".join(f"{t:.2f} ({cub / t:.3f}x)" for _, t in picks) +
              f" | best {best[0]:.2f} ({cub / best[0]:.3f}x) {best[1].kwargs} w{best[1].num_warps}")
    return r


def attn_tuned(B, ctx):
    sets = make_sets(B, ctx, n=max(2, min(16, (256 << 20) // (4 * B * ctx * 512))))
    sc = 128 ** -0.5
    r = {}
    for regs in (128,):
        ad._MERGE_REGS = regs
        ad._TUNED.clear()
        ad.attention_decode(*sets[0], sc, max_seq_len=ctx)
        splits, cfg = list(ad._TUNED.values())[0]
        t = graph_time([lambda s=s: ad.attention_decode(*s, sc, max_seq_len=ctx) for s in sets]) * 1e3
        r[f"regs={regs}"] = (splits, str(cfg), t)
        fused = {}
        for sp in (8, 16, 24, 32, 48, 64):
            for bn, w, st in ((64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (64, 8, 3)):
                if triton.cdiv(ctx, sp) < bn // 2:
                    continue
                c = ad._with_fused(triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st))
                out = torch.empty_like(sets[0][0])
                try:
                    tt = graph_time([lambda s=s: ad._launch(s[0], s[1], s[2], s[3], sc, sp, c, out)
                                     for s in sets]) * 1e3
                except Exception:  # noqa: BLE001
                    continue
                if sp not in fused or tt < fused[sp][0]:
                    fused[sp] = (tt, f"bn={bn} w={w} st={st}")
        r[f"fused regs={regs}"] = fused
        print(f"attn B={B} ctx={ctx} regs={regs}: tuned s={splits} {cfg.kwargs} w{cfg.num_warps} "
              f"st{cfg.num_stages} -> {t:.2f} us | fused best per split: " +
              ", ".join(f"{k}:{v[0]:.2f}" for k, v in fused.items()))
    import torch.nn.functional as F
    r["sdpa"] = graph_time([lambda s=s: F.scaled_dot_product_attention(
        s[0][:, :, None], s[1], s[2], scale=sc, enable_gqa=True) for s in sets]) * 1e3
    print(f"attn B={B} ctx={ctx}: sdpa {r['sdpa']:.2f} us; kv MB {4 * B * ctx * 512 / 1e6:.1f}")
    return r


def stability():
    """Tuner picks over six (GEMV) and three (attention) fresh tunings, each timed on rotating inputs
    (run with LAYERSTREAM_TUNING_CACHE=0, or the disk cache hands back the first pick)."""
    M, K, N = 8, 3584, 4608
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for _ in range(8)]
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    cub = cub_pre(xs, ws)
    for rep in range(6):
        gv._TUNED.clear()
        t0 = time.time()
        gv.gemv(xs[0], ws[0])
        c = list(gv._TUNED.values())[0]
        t = graph_time([lambda i=i: gv._launch(c, xs[i], ws[i], None, out, 16) for i in range(8)]) * 1e3
        print(f"stab gemv qkv M=8 pick {c.kwargs} w{c.num_warps} s{c.num_stages}: {t:.2f} us "
              f"({cub / t:.3f}x cublas {cub:.2f}), tuning {time.time() - t0:.1f}s", flush=True)
    sets = make_sets(1, 4096)
    sc = 128 ** -0.5
    for rep in range(3):
        ad._TUNED.clear()
        t0 = time.time()
        ad.attention_decode(*sets[0], sc, max_seq_len=4096)
        splits, cfg = list(ad._TUNED.values())[0]
        t = graph_time([lambda s=s: ad.attention_decode(*s, sc, max_seq_len=4096) for s in sets]) * 1e3
        print(f"stab attn 4k pick s={splits} {cfg.kwargs} w{cfg.num_warps} st{cfg.num_stages}: {t:.2f} us, "
              f"tuning {time.time() - t0:.1f}s", flush=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    what = sys.argv[1] if len(sys.argv) > 1 else "gt"
    if "g" in what:
        RES["gemv"] = gemv_probe()
        print(f"gemv done {time.time() - t0:.0f}s", flush=True)
    if "f" in what:
        RES["floors"] = f = floors(make_sets(1, 4096))
        for k, v in f.items():
            print(f"floor {k}: {v:.2f}")
    if "s" in what:
        stability()
    if "t" in what:
        for B, ctx in ((1, 4096), (8, 4096), (1, 32768)):
            RES[f"attn B={B} ctx={ctx}"] = attn_tuned(B, ctx)
            print(f"done {time.time() - t0:.0f}s", flush=True)
    with open(os.path.join(OUT, "probe.json"), "w") as fh:
        json.dump(RES, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
