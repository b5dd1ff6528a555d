"""Quantized-linear rows of ``tools.bench_kernels`` (groups ``qgemv``, ``qgemm``, ``qprefill``) at Qwen2.5-7B shapes.

The weights are int4 (or ``--quant-bits 8``) in the engine's canonical layout (kernels/quant_common.py)
with AWQ's group 128 and zero points. ``qgemv`` rates count the bytes a call must move (packed
codes, scales, zeros, x and out) and compare with the device-to-device copy ceiling measured in the
same run; its peer is the bf16 ``F.linear`` the packed weight replaces. ``qgemm`` rates are
FLOP/s of the 2048-token prefill; ``speedup_vs_torch`` is the bf16 cuBLAS time over ours (the
issue's "time-equivalent rate" ratio). ``qprefill`` times what the engine runs for such a chunk,
``kernels.qlinear`` (from ``DENSE_MIN_M`` rows: the weight widened into dense tiles of the engine's
scratch size, each through the dense GEMM), on the same operands and against the same peer.
``rel_err_vs_torch`` compares with ``F.linear`` on the dequantized weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tools.bench_common import Bench, copies, rel_err

# name, K, N of the Qwen2.5-7B projections quantized by the published AWQ / GPTQ checkpoints
QWEN7B_QUANT = [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888), ("down", 18944, 3584)]


def packed_operands(m: int, k: int, n: int, bits: int, group: int, device: str = "cuda") -> tuple:
    """(x bf16 [m, k], qweight, fp16 scales, fp16 zeros) with random codes, zeros within 2 of mid-range and
    scales that give the dequantized weight a std of about k**-0.5 (as AWQ checkpoints: fp16 scales)."""
    qweight = torch.randint(-(1 << 31), 1 << 31, (n, k * bits // 32), device=device, dtype=torch.int64).to(torch.int32)
    spread = ((1 << bits) ** 2 / 12) ** 0.5  # std of uniform codes around the mid-range zero
    scales = (torch.rand(n, k // group, device=device) * 0.4 + 0.8).mul_(k ** -0.5 / spread).to(torch.float16)
    mid = 1 << (bits - 1)  # zero points vary by group, as in AWQ / GPTQ checkpoints (a misindexed zero shows)
    zeros = torch.randint(mid - 2, mid + 3, (n, k // group), device=device).to(torch.float16)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    return x, qweight, scales, zeros


def bench_qlinear(b: Bench, group_name: str, batches: list[int], bits: int = 4, group: int = 128) -> None:
    """One row per (M, projection): ours on the packed weight against bf16 F.linear on the dense one."""
    from kernels.qgemm import qgemm
    from kernels.qgemv import qgemv
    from kernels.qlinear import qlinear
    from kernels.quant_common import dequant_ref

    fn = {"qgemv": qgemv, "qgemm": qgemm, "qprefill": qlinear}[group_name]
    for m in batches:
        for name, k, n in QWEN7B_QUANT:
            packed_bytes = n * k * bits // 8 + 2 * 2 * n * (k // group)
            sets = copies(lambda: packed_operands(m, k, n, bits, group), packed_bytes)
            ours = b.time_ms([lambda s=s: fn(s[0], s[1], s[2], s[3], bits) for s in sets])
            dense = dequant_ref(*sets[0][1:], bits).to(torch.bfloat16)
            dense_sets = copies(lambda: (torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                                         torch.randn(n, k, device="cuda", dtype=torch.bfloat16)), 2 * n * k)
            peer = b.time_ms([lambda s=s: F.linear(s[0], s[1]) for s in dense_sets])
            if group_name == "qgemv":
                work, unit = float(packed_bytes + 2 * (m * k + m * n)), "GB/s"
            else:
                work, unit = 2.0 * m * n * k, "TFLOP/s"
            err = rel_err(fn(sets[0][0], *sets[0][1:], bits), F.linear(sets[0][0], dense))
            b.add(group_name, name, f"M={m} K={k} N={n} int{bits} g{group}", ours, peer, work, unit, None, err)
            del sets, dense_sets, dense
            torch.cuda.empty_cache()
