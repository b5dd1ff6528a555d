"""Host RAM a loading thread holds beside the unit it fills: the working set of converting one layer.

Each layer's packed buffer is filled by a thread of the loader: ``streamer.host.pack_all`` / ``upload_all`` (up to
``--threads`` at once), ``engine.quant.cache`` writing its file, and all run long, the disk tier's reader (one
thread). Where a layer is not its file bytes as they are (raw spans, ``engine.weights.UnitBuilder``), the thread
converts it and holds temporaries meanwhile, which no tier of the plan counts. :func:`conversion` estimates one
thread's peak from the layer's shapes and its load path, kept above what was measured: the growth of peak RSS
(``VmHWM``) while a thread converts layer after layer (``python -m tools.convert_ram``: torch 2.13 on the CPU, glibc
malloc, bf16, synthetic Qwen2.5 / Llama-3.1 layers, the most over runs of 1 and 2 threads), MiB a thread, measured /
estimated:

    path                                            0.5B       7B (Llama 8B)   72B (Llama 70B)
    AWQ                                             32 / 47    216 / 259       622 / 844
    GPTQ int4 (int8 7B: 160 / 226)                  11 / 38    83 / 129
    GPTQ int4, act order (compressed-tensors too)   29 / 55    239 / 388       (c-t 7B: 219 / 291)
    --quantize int4                                 49 / 86    231 / 314       490 / 667
    --quantize int8                                 56 / 92    305 / 411       788 / 1014
    GGUF Q4_K_M repacked                            45 / 65    369 / 550       1127 / 1880
      (Q4_0 7B 191 / 356, Q8_0 246, Q5_K_M 418, Q6_K 456 / 550; Llama 8B 360 / 480, 70B 979 / 1824)
    GGUF layers widened (Q/K F16, the rest blocks)  58 / 94    451 / 526       (fp32 7B: 871 / 988)
    native GGUF: a Llama's Q/K blocks reordered     -          (12 / 43)       (42 / 73)
    raw spans, casts, other native GGUF             0 (2 MiB: the thread's own stack and arena)

Per module of N x K weights (V = N * K values) a path takes :func:`per_value` bytes a value, the largest module of
the layer counts, plus :data:`BASE`. Rounding to nearest adds its blocks' temporaries (:data:`RTN_ROW_BYTES` a
value of ``engine.quant.rtn``'s blocks of rows); a widened GGUF layer holds all its widened tensors at once (the
dict ``UnitBuilder`` packs from). The figures grow with V: a 70B-class thread needs 0.7 to 1.9 GiB, eight at once
several GB, which the preflight (``engine.preflight``) counts for one thread and the loader's thread count bounds.
"""

from __future__ import annotations

from math import prod

import torch

from engine.config import ModelConfig
from engine.gguf.names import permuted_heads
from engine.quant.ggml import MODULES, NativeLayouts
from engine.quant.layout import FUSED_LINEARS, LayerQuant, QuantLayerLayout, linear_shapes
from engine.quant.rtn import BLOCK_ROWS
from engine.tables import widens
from engine.weights import UnitBuilder, layer_layout
from memory.plan import Plan

MiB = 1 << 20
BASE = 32 * MiB  # a converting thread's own: its malloc arena, small temporaries (most of a 0.5B layer's peak)
RTN_ROW_BYTES = 20  # temporaries a value of a block of rounded rows (fp32 copy, codes, bytes: ~13 live, fragmented)
DEQUANT_TEMPS = 32 * MiB  # engine.gguf.dequant's float32 temporaries of one step (CHUNK_VALUES values)
WIDEN_SLACK = 1.1  # widened tensors: what malloc holds over their bytes (measured up to 1.07 with the rest)
_NAMES = {"awq": "AWQ", "gptq": "GPTQ"}
Conversion = tuple[int, str]  # (bytes a thread, the conversion in words)


def per_value(quant: LayerQuant, fused: str) -> float:
    """Bytes a value of a module of fused projection ``fused`` (``mlp.down_proj``) a thread holds converting it
    (the module before's canonical form still held): repacking codes and scales into the canonical layout."""
    bits = quant.form(fused)[0].bits
    if quant.loader is not None:  # GGUF blocks (engine.gguf.repack): 8-bit targets unpack the codes, fp32 scales
        return 8.0 if bits == 8 else 5.0
    if quant.source is None:  # rounded to nearest: the module's codes and the one before (engine.quant.rtn)
        return 3.0 * bits / 8
    method = quant.source.quant_method
    own = {"awq": 3.5, "gptq": 3.0 * bits / 8}.get(method, 0.0)  # compressed-tensors: its codes are a file view
    return own + (16 / bits if quant.act_order else 0.0)  # act order: codes unpacked, permuted, packed again


def _what(quant: LayerQuant) -> str:
    if quant.loader is not None:
        return "GGUF blocks repacked"
    if quant.source is None:
        return f"rounding to int{quant.spec.bits} (--quantize)"
    return f"{_NAMES.get(quant.source.quant_method, quant.source.quant_method)} repacking"


def _quant_layer(cfg: ModelConfig, quant: LayerQuant) -> Conversion:
    """A quantized layer packed on the host (every layer has the same shapes)."""
    shapes, worst = linear_shapes(cfg), 0.0
    for fused, parts in FUSED_LINEARS.items():
        for part in parts:
            n, k = shapes[part]
            rows = RTN_ROW_BYTES * min(n, BLOCK_ROWS) * k if quant.loader is None and quant.source is None else 0
            worst = max(worst, per_value(quant, fused) * n * k + rows)
    return BASE + int(worst), _what(quant)


def _reordered(ckpt, cfg: ModelConfig, name: str) -> bool:
    """Whether reading ``name`` copies it to put llama's Q/K rows back in order (GGUF files store them permuted)."""
    return hasattr(ckpt, "raw") and permuted_heads(cfg, name) is not None


def _native_layer(ckpt, cfg: ModelConfig, i: int) -> Conversion:
    """GGUF blocks copied as they are; a Llama's Q/K blocks are reordered through a copy first."""
    moved = sum(ckpt.tensors[n].nbytes for n in (f"model.layers.{i}.{m}.weight" for m in MODULES)
                if _reordered(ckpt, cfg, n))
    return (BASE + moved, "GGUF Q/K blocks reordered") if moved else (0, "")


def _dense(ckpt, cfg: ModelConfig, dtype: torch.dtype, names: list[str]) -> Conversion:
    """Dense tensors packed from ``names`` at once: GGUF blocks widened into ``dtype`` (and reordered Q/K rows) are
    new tensors; a float tensor is a view of the map, cast as it is copied (nothing held)."""
    def nbytes(name: str) -> int:
        info = ckpt.tensors[name]
        return prod(info.shape) * (dtype.itemsize if widens(ckpt, name) else info.dtype.itemsize)
    widened = sum(nbytes(n) for n in names if widens(ckpt, n))
    moved = sum(nbytes(n) for n in names if _reordered(ckpt, cfg, n))
    if not widened and not moved:
        return 0, ""
    return BASE + DEQUANT_TEMPS + int(WIDEN_SLACK * widened) + moved, "GGUF blocks widened"


def conversion(plan: Plan, ckpt, cfg: ModelConfig, dtype: torch.dtype, quant: LayerQuant | None,
               quant_cache: bool = False) -> Conversion:
    """(bytes, what) one loading thread holds at most converting a unit of ``plan`` beside the unit's own buffer:
    the largest over its layers (and widened lm_head chunks) by load path; (0, "") when every unit is file bytes
    as they are or a cast of them. With ``quant_cache`` a thread writing the cache file also holds a layer."""
    layout = layer_layout(cfg, dtype, quant)
    build = UnitBuilder(ckpt, cfg, layout, head_blocks=quant.native_head if quant is not None else None)
    worst: Conversion = (0, "")
    for i in range(cfg.num_hidden_layers):
        if build.layer(i, "pinned").spans:
            continue
        if isinstance(layout, NativeLayouts):
            worst = max(worst, _native_layer(ckpt, cfg, i))
        elif isinstance(layout, QuantLayerLayout):
            worst = max(worst, _quant_layer(cfg, quant))
        else:
            worst = max(worst, _dense(ckpt, cfg, dtype, [f"model.layers.{i}.{n}" for n in layout.names]))
    if quant_cache and quant is not None and not quant.native and worst[0]:
        worst = (worst[0] + layout.nbytes, worst[1] + " into the --quant-cache file")
    if not plan.lm_head_resident:
        for unit in build.lm_head_chunks(plan.lm_head_chunks, "pinned"):
            if unit.pack is not None and widens(ckpt, build.head_name):  # the chunk's rows widened, then copied
                worst = max(worst, (BASE + DEQUANT_TEMPS + int(WIDEN_SLACK * unit.nbytes), "GGUF lm_head widened"))
    return worst

