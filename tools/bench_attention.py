"""Attention benchmarks of tools/bench_kernels.py: decode (flash-decoding against SDPA and the
time a kernel that only reads the same KV bytes needs) and causal prefill (against SDPA).

Why the read floor: at batch 1 and 4k tokens the KV cache of one Qwen2.5-7B layer is 8.4 MB,
under 3 us of HBM traffic, so a kernel's launch, ramp-up and tail dominate; the floor row says
what fraction of the copy ceiling any kernel reading those bytes once reaches in the same timing,
and the copy row what the ceiling's own operation (a device copy, cuda's copy kernel) reaches
when it moves as many bytes (reads half, writes half).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tools.bench_common import Bench, copies, rel_err

# (programs, elements per load step, warps) of the read-floor kernel; the fastest counts
_FLOOR_CONFIGS = [(256, 4096, 8), (512, 1024, 4), (512, 4096, 8), (1024, 1024, 4), (1024, 2048, 4),
                  (2048, 1024, 4)]


@triton.jit
def _read_floor_kernel(k_ptr, v_ptr, out_ptr, per_prog, BLOCK: tl.constexpr):
    """Program p sums elements [p * per_prog, (p + 1) * per_prog) of k and of v (read once)."""
    offs = tl.arange(0, BLOCK)
    base = tl.program_id(0).to(tl.int64) * per_prog
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, per_prog, BLOCK):
        acc += tl.load(k_ptr + base + i + offs).to(tl.float32)
        acc += tl.load(v_ptr + base + i + offs).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def _read_floor(b: Bench, sets: list[tuple]) -> tuple[tuple[float, float], str] | None:
    """Fastest (graph, eager) ms of reading every set's k and v once, and its config."""
    n = sets[0][1].numel()
    best = None
    for progs, block, warps in _FLOOR_CONFIGS:
        if n % (progs * block):
            continue
        out = torch.empty(progs, device="cuda", dtype=torch.float32)
        t = b.time_ms([lambda s=s: _read_floor_kernel[(progs,)](s[1], s[2], out, n // progs, BLOCK=block,
                                                                 num_warps=warps) for s in sets])
        if best is None or t[0] < best[0][0]:
            best = (t, f"programs={progs} block={block} warps={warps}")
    return best


def _copy_same_traffic(b: Bench, kv_bytes: int) -> tuple[float, float]:
    """(graph, eager) ms of a device copy that reads kv_bytes / 2 and writes kv_bytes / 2."""
    n = kv_bytes // 2

    def make() -> tuple:
        return torch.empty(n, device="cuda", dtype=torch.uint8), torch.empty(n, device="cuda", dtype=torch.uint8)
    pairs = copies(make, kv_bytes)
    return b.time_ms([lambda p=p: p[1].copy_(p[0]) for p in pairs])


def _sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    try:
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    except TypeError:  # older torch: expand the kv heads
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), scale=scale)


def bench_decode_attn(b: Bench, contexts: list[int], batches: list[int]) -> None:
    """Flash-decoding at each (batch, context) against SDPA, plus the KV read floor."""
    from kernels import attention_decode as mod
    hq, hk, d = 28, 4, 128
    for B in batches:
        for ctx in contexts:
            kv_bytes = 2 * B * hk * ctx * d * 2

            def make() -> tuple:
                return (torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16),
                        torch.randn(B, hk, ctx, d, device="cuda", dtype=torch.bfloat16),
                        torch.randn(B, hk, ctx, d, device="cuda", dtype=torch.bfloat16),
                        torch.full((B,), ctx, device="cuda", dtype=torch.int32))
            sets = copies(make, kv_bytes)
            sc = d ** -0.5
            ours = b.time_ms([lambda s=s: mod.attention_decode(*s, sc, max_seq_len=ctx) for s in sets])
            cfg = None
            if mod._TUNED:
                splits, conf = list(mod._TUNED.values())[-1]
                cfg = f"splits: {splits}, {conf}"
            peer = b.time_ms([lambda s=s: _sdpa_decode(s[0], s[1], s[2], sc) for s in sets])
            err = rel_err(mod.attention_decode(*sets[0], sc), _sdpa_decode(*sets[0][:3], sc))
            shape = f"B={B} Hq={hq} Hk={hk} D={d} ctx={ctx}"
            b.add("decode_attn", "attention_decode", shape, ours, peer, float(kv_bytes), "GB/s", cfg, err)
            floor = _read_floor(b, sets)
            if floor is not None:
                b.add("decode_attn", "kv_read_floor", shape, floor[0], None, float(kv_bytes), "GB/s", floor[1])
            b.add("decode_attn", "copy_same_bytes", shape, _copy_same_traffic(b, kv_bytes), None,
                  float(kv_bytes), "GB/s", "device copy, kv_bytes / 2 read + kv_bytes / 2 written")
            del sets
            torch.cuda.empty_cache()


def bench_prefill_attn(b: Bench, t: int) -> None:
    from kernels import attention_prefill as mod
    B, hq, hk, d = 1, 28, 4, 128
    q = torch.randn(B, t, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, hk, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sp = torch.zeros(B, device="cuda", dtype=torch.int32)
    ql = torch.full((B,), t, device="cuda", dtype=torch.int32)
    sc = d ** -0.5
    ours = b.time_ms([lambda: mod.attention_prefill(q, k, v, sp, ql, sc)])
    cfg = list(mod._TUNED.values())[-1] if mod._TUNED else None
    qh = q.transpose(1, 2).contiguous()
    ke, ve = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    peer = b.time_ms([lambda: F.scaled_dot_product_attention(qh, ke, ve, is_causal=True, scale=sc)])
    flops = 4.0 * B * hq * d * t * (t + 1) / 2  # causal: QK^T and PV over the lower triangle
    err = rel_err(mod.attention_prefill(q, k, v, sp, ql, sc),
                   F.scaled_dot_product_attention(qh, ke, ve, is_causal=True, scale=sc).transpose(1, 2))
    b.add("prefill_attn", "attention_prefill", f"B={B} T={t} Hq={hq} Hk={hk} D={d}",
          ours, peer, flops, "TFLOP/s", cfg, err)
