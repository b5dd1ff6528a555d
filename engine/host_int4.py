"""int4 host layers on torch's CPU int4 kernel (``torch._weight_int4pack_mm_for_cpu``).

The host lane (``engine.host_lane``) computes quantized layers on the CPU. Dequantizing an int4
weight per call writes and re-reads a full-precision copy of it (8x the packed bytes in fp32),
which is what a GEMV is bound by. Torch's CPU int4 kernel unpacks in registers instead; it wants
its own packing of the codes (``torch._convert_weight_to_int4pack_for_cpu``, uint8 [N, K/2]: the
same bytes as the canonical int32 [N, K/8]) and a ``scales_and_zeros`` tensor [K/G', N, 2] for
the convention ``w = (code - 8) * scale + zero``. So a host layer's int4 weights are converted
once, when the lane is set up, from the canonical form (``engine.quant.spec``):

    (code - z) * s       = (code - 8) * s + (8 - z) * s     (zero points; symmetric: z = 8)
    code * s + m         = (code - 8) * s + (8 * s + m)     (additive mins)

The kernel wants N % 16 == 0 and a group G' of 32, 64, 128 or 256; a group size that is a
multiple of one of those (per-channel scales too) is expressed at that G' by repeating its scale
and zero. The kernel computes in the activations' dtype and wants ``scales_and_zeros`` in it too.
Measured on a 2-vCPU Xeon with AMX (``tools.bench_host_int4 --dtype``, K=3584 N=4608, batch 1),
its bf16 path was at least 5x faster than its fp32 and its fp16 ones in every run, so fp16 and bf16 host
lanes run it in bf16 (:func:`kernel_dtype`: the few KB of activations are cast, the result is cast
back) and fp32 lanes in fp32. In fp32 the scales and zeros above are exact (fp16 or bf16 scales
times a small integer); in bf16 the scale and the zero are rounded to bf16 once (at most 2**-9
relative each: a few hundredths of one quantization step, where the dequantizing path rounded
every weight to the compute dtype instead). Anything else (int8, other shapes) returns None and
keeps the dequantizing path.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from engine.quant.spec import QuantSpec, QuantWeight, pack_codes, unpack_codes
from memory.host_rate import timing_bytes

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes the CPU kernel takes, largest first
N_MULTIPLE = 16  # the CPU packing's block of output rows
_TILE_ROWS = 1024  # the timed int4 weight: one converted block of this many rows, repeated
_INNER_K_TILES = 2  # an argument of the packing op; the CPU packing ignores it (same bytes for 1..8)
CONVERT_VALUES = 1 << 22  # codes converted at a time (their int32 copy: 16 MiB)
_PACK_BLOCK = 256  # rows converted together: whole 64-row blocks of the CPU packing (pieces of 16 or 32 rows differ)


@dataclass(frozen=True)
class CpuInt4Weight:
    """One int4 linear weight in torch's CPU int4 form (module docstring)."""

    packed: torch.Tensor  # uint8 [N, K / 2], torch's CPU packing
    scales_and_zeros: torch.Tensor  # [K / group, N, 2] in the activations' dtype
    group: int  # the kernel's group size
    perm: torch.Tensor | None  # int64 [K]: input columns in packed order (act-order), or None
    shape: tuple[int, int]  # (N, K)

    @property
    def nbytes(self) -> int:
        """Host bytes this form holds (packed codes, scales and zeros, perm)."""
        extra = self.perm.numel() * self.perm.element_size() if self.perm is not None else 0
        sz = self.scales_and_zeros
        return self.packed.numel() + sz.numel() * sz.element_size() + extra


def kernel_group(group: int) -> int | None:
    """The kernel group size that ``group`` (a multiple of it) is expressed at, or None."""
    return next((g for g in KERNEL_GROUPS if group % g == 0), None)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU int4 kernel runs in for a host lane computing in ``dtype`` (module docstring)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _takes(w: QuantWeight) -> int | None:
    """The kernel group size ``w`` is converted at, or None when the kernel cannot take it (not int4, N not a
    multiple of 16, no kernel group size divides the weight's, or no such kernel in torch)."""
    kg = kernel_group(w.group_size)
    if (w.spec.bits != 4 or w.shape[0] % N_MULTIPLE or kg is None
            or not hasattr(torch, "_convert_weight_to_int4pack_for_cpu")):
        return None
    return kg


def cpu_int4_nbytes(w: QuantWeight, dtype: torch.dtype) -> int:
    """``CpuInt4Weight.nbytes`` of ``to_cpu_int4(w, dtype)`` from the shapes alone (0 when the kernel does not take
    ``w``; ``w`` may view a meta buffer): what the host lane's converted copy of it holds."""
    kg = _takes(w)
    n, k = w.shape
    return 0 if kg is None else n * k // 2 + k // kg * n * 2 * dtype.itemsize + (k * 8 if w.perm is not None else 0)


def _packed_rows(qweight: torch.Tensor) -> torch.Tensor:
    """Torch's CPU packing of int4 codes (canonical int32 [N, K/8]), :data:`CONVERT_VALUES` codes at a time: whole,
    the int32 codes it takes were 8x the packed bytes (a 7B gate_up: 0.5 GiB, a 70B's: 1.8 GiB at lane setup)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty((n, k // 2), dtype=torch.uint8)
    step = max(_PACK_BLOCK, CONVERT_VALUES // k // _PACK_BLOCK * _PACK_BLOCK)
    for r in range(0, n, step):
        codes = unpack_codes(qweight[r:r + step].cpu(), 4).to(torch.int32)  # [rows, K], packed column order
        out[r:r + step] = torch._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
    return out


def to_cpu_int4(w: QuantWeight, dtype: torch.dtype) -> CpuInt4Weight | None:
    """``w`` converted for torch's CPU int4 kernel with ``dtype`` activations, or None when the kernel
    cannot take it (:func:`_takes`)."""
    n, k = w.shape
    kg = _takes(w)
    if kg is None:
        return None
    packed = _packed_rows(w.qweight)
    s = w.scales.float().cpu()
    if w.mins is not None:
        zero = 8.0 * s + w.mins.float().cpu()
    elif w.zeros is not None:
        zero = (8.0 - w.zeros.float().cpu()) * s
    else:
        zero = torch.zeros_like(s)
    rep = w.group_size // kg
    pairs = torch.stack((s, zero), dim=-1).repeat_interleave(rep, dim=1)  # [N, K / kg, 2]
    perm = w.perm.long().cpu() if w.perm is not None else None
    return CpuInt4Weight(packed, pairs.transpose(0, 1).to(dtype).contiguous(), kg, perm, (n, k))


def int4_linear(x: torch.Tensor, w: CpuInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` with torch's CPU int4 kernel, in the dtype ``w`` was converted
    for (x is cast to it when it differs); the result in x's dtype."""
    n, k = w.shape
    assert x.shape[-1] == k, (tuple(x.shape), w.shape)
    x2 = x.reshape(-1, k).to(w.scales_and_zeros.dtype)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group, w.scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def convert_layer(views: dict[str, object], dtype: torch.dtype) -> tuple[dict[str, object], int]:
    """A host layer's tensors with every int4 weight the kernel takes converted for a lane computing in
    ``dtype`` (the rest as given), and the host bytes the converted copies hold."""
    out, extra = dict(views), 0
    for name, t in views.items():
        if isinstance(t, QuantWeight):
            c = to_cpu_int4(t, kernel_dtype(dtype))
            if c is not None:
                out[name], extra = c, extra + c.nbytes
    return out, extra


def random_int4(n: int, k: int, group: int, seed: int = 0) -> QuantWeight:
    """A random asymmetric int4 weight [n, k] (fp16 scales, integer zero points) in the canonical form."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand((n, k // group), generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 16, (n, k // group), generator=gen).half()
    return QuantWeight(pack_codes(codes, 4), scales, zeros, None, QuantSpec(4, group, False, "awq"), k)


def patterned_int4(n: int, k: int, group: int) -> QuantWeight:
    """An int4 weight [n, k] in the canonical form whose codes repeat along each row (for timing: the kernel
    reads every byte whatever they hold, and random codes cost a first run more than the timing itself)."""
    codes = (torch.arange(k, dtype=torch.int32) % 16).to(torch.uint8).expand(n, k).contiguous()
    scales = torch.full((n, k // group), 0.01, dtype=torch.float16)
    zeros = torch.full((n, k // group), 8.0, dtype=torch.float16)
    return QuantWeight(pack_codes(codes, 4), scales, zeros, None, QuantSpec(4, group, False, "awq"), k)


def _tiled_cpu_int4(rows: int, k: int, group: int, dtype: torch.dtype, block: int = _TILE_ROWS) -> CpuInt4Weight | None:
    """A [rows, k] weight in the CPU kernel's form made of one converted block of ``block`` rows repeated (the
    conversion of a whole 256 MiB weight took 0.9 s on a 2-core machine; its timing reads every byte alike)."""
    base = to_cpu_int4(patterned_int4(min(rows, block), k, group), dtype)
    if base is None or rows <= block:
        return base
    reps = rows // block
    assert reps * block == rows, (rows, block)
    return CpuInt4Weight(base.packed.repeat(reps, 1), base.scales_and_zeros.repeat(1, reps, 1), base.group, None,
                         (rows, k))


def measure_int4_gemv(batch: int, dtype: torch.dtype, group: int = 128, nbytes: int | None = None,
                      repeats: int = 5, hidden: int = 4096) -> float:
    """GB/s (10**9 bytes/s) of int4 weight bytes as the plan counts them (packed codes, fp16 scales and
    zeros) that :func:`int4_linear` reads with ``batch`` rows of ``dtype`` activations, in the kernel dtype a
    lane in ``dtype`` runs it in (:func:`kernel_dtype`, as :func:`convert_layer` converts): a weight of about
    ``nbytes`` (default ``memory.host_rate.timing_bytes`` of 128 MiB), the median of ``repeats`` timed calls
    after a warm-up. The host lane's rate for int4 layers (``memory.host_rate``)."""
    nbytes = timing_bytes(128 << 20) if nbytes is None else nbytes
    if batch < 1 or nbytes <= 0 or repeats <= 0 or hidden % group:
        raise ValueError(f"batch, nbytes, repeats must be positive and group divide hidden, got {batch}, "
                         f"{nbytes}, {repeats}, {group} / {hidden}")
    per_row = hidden // 2 + 2 * 2 * (hidden // group)  # codes, fp16 scales and zeros
    rows = max(N_MULTIPLE, nbytes // per_row // N_MULTIPLE * N_MULTIPLE)
    rows = rows if rows <= _TILE_ROWS else rows // _TILE_ROWS * _TILE_ROWS
    w = _tiled_cpu_int4(rows, hidden, group, kernel_dtype(dtype))  # as convert_layer runs it
    if w is None:
        raise ValueError(f"torch {torch.__version__} has no CPU int4 kernel for group {group}")
    x = torch.randn(batch, hidden).to(dtype)
    int4_linear(x, w)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        int4_linear(x, w)
        times.append(time.perf_counter() - t0)
    return rows * per_row / statistics.median(times) / 1e9


def int4_host_group(quant) -> int | None:
    """The kernel group size a run's quantized layers (an ``engine.quant.layout.LayerQuant``) take torch's
    CPU int4 kernel at, or None when some of them cannot (int8 forms, or a group size no kernel group
    divides). Per-channel scales (group -1) are repeated at 256 for a hidden size that 256 divides."""
    if quant.native:  # GGUF blocks (engine.quant.ggml): no CPU kernel reads them packed
        return None
    specs = [quant.spec, *(spec for _, spec, _ in quant.forms)]
    groups = [256 if s.group_size == -1 else kernel_group(s.group_size) for s in specs]
    if any(s.bits != 4 for s in specs) or any(g is None for g in groups):
        return None
    return min(groups)
