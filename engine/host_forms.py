"""How a host layer's quantized weights are held for the CPU, and the host rate the plan uses.

The host lane (``engine.host_lane``) reads a host layer from its pinned copy. Full-precision layers
run through torch's dense GEMV as they are. Quantized layers have two forms worth running:

* ``int4``: torch's CPU int4 kernel on the packed codes (``engine.host_int4``), for int4 layers it
  takes. It reads the fewest bytes, but its speed depends on the CPU's vector units: on the H200
  host it read 0.9 GB/s (bench/results/2026-12-02-h200-s11), where the dense bf16 GEMV reads 36.7
  GB/s beside host-to-device copies and 70.6 alone; on this project's 2-vCPU AVX2 CI machine it read
  7.5 GB/s, faster there than the widened form (bench/results/2026-12-04-cpu-host-lane).
* ``widened``: every quantized weight of a host layer dequantized once, when the lane is set up,
  to the lane's dtype (a copy in ordinary host memory beside the pinned packed one) and run through
  the dense GEMV: ~3.6x the bytes of int4 g128 in bf16, read at the dense rate. Any quantized form
  can be widened (int8, GGUF blocks); its rate in the plan's bytes (the packed layer) is the dense
  rate times packed / widened bytes.

Which one: the engine measures the candidates' rates on this machine (cached, ``memory.host_rate``:
the int4 kernel under its own entry, a widened layer under the dense GEMV's, which its lane's
achieved rate updates too) and takes the faster; ``widened`` is a candidate only when every layer's
widened copy would fit in :data:`WIDEN_RAM_SHARE` of the RAM available (the plan picks the host
layers after their rate, so the count is not known yet). ``LAYERSTREAM_HOST_WEIGHTS=int4|widened``
forces a form (A/B runs, tests); with no measured rate (a CPU device, ``--host-compute N``) int4
layers the kernel takes keep it and others are widened when they fit. ``packed`` (no candidate
fits): dequantized per call (``engine.ops.TorchOps.linear``), slow but exact.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable

import psutil
import torch

from engine.config import ModelConfig
from engine.host_int4 import convert_layer, cpu_int4_nbytes, int4_host_group, kernel_dtype, measure_int4_gemv
from engine.layout import LayerLayout
from engine.quant.ggml import GGMLWeight, NativeLayouts
from kernels.ggml_blocks import dequant_ref
from engine.quant.layout import QuantLayerLayout
from engine.quant.spec import QuantWeight, dequantize

INT4, WIDENED, PACKED = "int4", "widened", "packed"
WIDEN_RAM_SHARE = 0.25  # widened copies of every layer within this share of the available RAM


def widened_layer_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """One layer's bytes with every weight in ``dtype`` (a widened host layer's copy)."""
    return LayerLayout.build(cfg, dtype).nbytes


def held_layer_bytes(cfg: ModelConfig, dtype: torch.dtype, quant, form: str) -> int:
    """Host bytes one host layer's copies in ``form`` hold beside its pinned packed copy (what :func:`hold_layer`
    returns, from the layer's shapes alone): the int4 kernel's form of the int4 weights it takes, or every
    quantized weight widened to ``dtype``; 0 for full-precision layers and the packed form. The largest over a
    GGUF's layers (they differ only in block types). The plan counts it per host layer (``memory.host_lane``)."""
    if quant is None or form not in (INT4, WIDENED):
        return 0
    if quant.native:
        layouts = NativeLayouts.build(cfg, dtype, quant.native)
        layout = max((layouts.of(i) for i in range(cfg.num_hidden_layers)), key=lambda lay: lay.nbytes)
    else:
        layout = QuantLayerLayout.build(cfg, dtype, quant)
    views = layout.views(torch.empty(layout.nbytes, dtype=torch.uint8, device="meta"))
    ws = [w for w in views.values() if isinstance(w, QuantWeight | GGMLWeight)]
    if form == WIDENED:
        return sum(w.shape[0] * w.shape[1] for w in ws) * dtype.itemsize
    return sum(cpu_int4_nbytes(w, kernel_dtype(dtype)) for w in ws if isinstance(w, QuantWeight))


def packed_per_widened(cfg: ModelConfig, dtype: torch.dtype, quant) -> float:
    """A quantized layer's bytes (the plan's, the mean over a GGUF's layers) over its widened bytes."""
    if quant.native:
        packed = statistics.fmean(NativeLayouts.build(cfg, dtype, quant.native).layer_bytes)
    else:
        packed = QuantLayerLayout.build(cfg, dtype, quant).nbytes
    return packed / widened_layer_bytes(cfg, dtype)


def weight_forms(cfg: ModelConfig, dtype: torch.dtype, quant, available: int | None = None) -> tuple[str, ...]:
    """The forms a run's host layers may take, preferred first when no rate decides: ``("",)`` for
    full-precision layers; for quantized ones ``int4`` (the CPU kernel takes them) and ``widened``
    (every layer's copy fits :data:`WIDEN_RAM_SHARE` of ``available`` bytes, default: RAM available
    now), else ``(packed,)``; ``LAYERSTREAM_HOST_WEIGHTS`` narrows them to the one it names."""
    if quant is None:
        return ("",)
    forms = [INT4] if not quant.native and int4_host_group(quant) is not None else []
    ram = psutil.virtual_memory().available if available is None else available
    if cfg.num_hidden_layers * widened_layer_bytes(cfg, dtype) <= WIDEN_RAM_SHARE * ram:
        forms.append(WIDENED)
    forced = os.environ.get("LAYERSTREAM_HOST_WEIGHTS", "")
    if forced:
        if forced not in (INT4, WIDENED):
            raise ValueError(f"LAYERSTREAM_HOST_WEIGHTS must be {INT4} or {WIDENED}, got {forced!r}; unset it "
                             "to let the engine pick the faster form")
        if forced not in forms:
            why = ("torch's CPU int4 kernel does not take these layers" if forced == INT4 else
                   f"{cfg.num_hidden_layers} widened layers would not fit {WIDEN_RAM_SHARE:.0%} of the RAM available")
            raise ValueError(f"LAYERSTREAM_HOST_WEIGHTS={forced}: {why}; unset it or pick the other form")
        forms = [forced]
    return tuple(forms) or (PACKED,)


def form_name(form: str, quant, dtype: torch.dtype) -> str:
    """The host rate cache's name for what the CPU runs in a form: the int4 kernel's own entry, named with
    the dtype it computes in for a lane in ``dtype`` (engine.host_int4.kernel_dtype), else "" (the dense
    GEMV: full-precision and widened layers share its measured and achieved rates)."""
    if form != INT4:
        return ""
    return f"int4 g{int4_host_group(quant)} CPU kernel in {str(kernel_dtype(dtype)).removeprefix('torch.')}"


RateFn = Callable[..., tuple[float, str]]  # memory.host_rate.host_gemv_rate's signature


def pick_form(forms: tuple[str, ...], quant, dtype: torch.dtype, batch: int, packed_per_widened: float,
              rate: RateFn) -> tuple[str, float, str]:
    """``(form, GB/s in the plan's layer bytes, source)`` of the fastest of ``forms`` (not ``packed``):
    ``rate(batch, dtype, form=name, measure=fn)`` is :func:`memory.host_rate.host_gemv_rate` with the
    device to contend fixed; a widened layer reads ``1 / packed_per_widened`` times its packed bytes."""
    assert PACKED not in forms, forms
    best = None
    for form in forms:
        measure = functools.partial(measure_int4_gemv, group=int4_host_group(quant)) if form == INT4 else None
        gbps, source = rate(batch, dtype, form=form_name(form, quant, dtype), measure=measure)
        if form == WIDENED:
            gbps, source = gbps * packed_per_widened, f"{source}, the dense GEMV's over the widened bytes"
        if best is None or gbps > best[1]:
            best = (form, gbps, source)
    assert best is not None
    return best


WIDEN_ROWS = 1024  # output rows dequantized at a time: bounds the fp32 temporaries (~16 bytes a weight)
WIDEN_VALUES = 1 << 22  # and at most this many weights (a 70B's down_proj, K 28672: 146 rows, 64 MiB, not 448)


def widen(w: QuantWeight | GGMLWeight, dtype: torch.dtype) -> torch.Tensor:
    """``w`` dequantized to a contiguous ``dtype`` [N, K], :data:`WIDEN_ROWS` output rows (at most
    :data:`WIDEN_VALUES` weights) at a time (a 7B gate_up at once would hold ~2 GB of fp32 temporaries)."""
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype)
    step = max(1, min(WIDEN_ROWS, WIDEN_VALUES // k))
    if isinstance(w, GGMLWeight):
        for row, qtype, blocks in w.rows():
            for r in range(0, blocks.shape[0], step):
                part = blocks[r:r + step]
                out[row + r:row + r + part.shape[0]] = dequant_ref(part, qtype, k)
        return out
    for r in range(0, n, step):
        rows = slice(r, r + step)
        part = QuantWeight(w.qweight[rows], w.scales[rows], None if w.zeros is None else w.zeros[rows], w.perm,
                           w.spec, k, None if w.mins is None else w.mins[rows])
        out[rows] = dequantize(part)
    return out


def hold_layer(views: dict[str, object], dtype: torch.dtype, form: str) -> tuple[dict[str, object], int]:
    """A host layer's tensors as ``form`` holds them (``int4``: engine.host_int4's conversion; ``widened``:
    every quantized weight dequantized to ``dtype`` by :func:`widen`; else as given) and the host bytes
    the converted copies take beside the pinned ones."""
    if form == INT4:
        return convert_layer(views, dtype)
    if form != WIDENED:
        return dict(views), 0
    out, extra = dict(views), 0
    for name, t in views.items():
        if isinstance(t, QuantWeight | GGMLWeight):
            out[name] = widen(t, dtype)
            extra += out[name].nbytes
    return out, extra
