"""Quantized runs at the checkpoint level: which quantization applies, and whether the files match it.

``layer_quant`` decides how the decoder layers' linear weights are held in a run: as the
checkpoint's ``quantization_config`` says, or rounded to nearest at load (``--quantize``) from a
full-precision checkpoint. ``validate_quant_checkpoint`` checks every tensor name, shape and dtype of
a quantized checkpoint from the safetensors headers alone (nothing is read), reporting all problems
in one ValueError, as ``engine.checkpoint.Checkpoint.validate`` does for full-precision ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.layout import expected_tensors
from engine.quant.config import QuantizationConfig, parse_quantization_config
from engine.quant.layout import FUSED_LINEARS, LayerQuant, linear_shapes
from engine.quant.rtn import DEFAULT_GROUP, default_sym
from engine.quant.spec import QuantSpec

I32, HALF = (torch.int32,), (torch.float16, torch.bfloat16)
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
QUANTIZE = {"int8": 8, "int4": 4}


def read_quantization(model_dir: str | Path) -> QuantizationConfig | None:
    """The ``quantization_config`` of ``model_dir/config.json`` (None: a full-precision checkpoint)."""
    return parse_quantization_config(json.loads((Path(model_dir) / "config.json").read_text()))


Expected = dict[str, tuple[tuple[int, ...], tuple, bool]]  # name -> (shape, allowed dtypes, required)


def module_tensors(qc: QuantizationConfig, prefix: str, n: int, k: int) -> Expected:
    """name -> (shape, allowed dtypes, required) of one quantized module as the format publishes it."""
    spec = qc.spec
    per, g = spec.pack, spec.group(k)
    if qc.quant_method == "awq":
        out = {"qweight": ((k, n // 8), I32, True), "scales": ((k // g, n), HALF, True)}
        if not spec.sym:
            out["qzeros"] = ((k // g, n // 8), I32, True)
    elif qc.quant_method == "gptq":
        out = {"qweight": ((k // per, n), I32, True), "qzeros": ((k // g, n // per), I32, True),
               "scales": ((k // g, n), HALF, True), "g_idx": ((k,), (torch.int32, torch.int64), False)}
    else:
        out = {"weight_packed": ((n, k // per), I32, True), "weight_scale": ((n, k // g), HALF, True),
               "weight_shape": ((2,), (torch.int64, torch.int32), True),
               "weight_g_idx": ((k,), (torch.int32, torch.int64), False)}
        if not spec.sym:
            out["weight_zero_point"] = ((-(-n * spec.bits // 32), k // g), I32 + (torch.int8,), True)
    return {f"{prefix}.{name}": v for name, v in out.items()}


def _expected(cfg: ModelConfig, qc: QuantizationConfig) -> Expected:
    shapes = linear_shapes(cfg)
    linear_weights = {f"model.layers.{i}.{m}.weight" for i in range(cfg.num_hidden_layers) for m in shapes}
    out = {name: (shape, FLOATS, True) for name, shape in expected_tensors(cfg).items() if name not in linear_weights}
    for i in range(cfg.num_hidden_layers):
        for module, (n, k) in shapes.items():
            out.update(module_tensors(qc, f"model.layers.{i}.{module}", n, k))
    return out


def validate_quant_checkpoint(ckpt: Checkpoint, cfg: ModelConfig, qc: QuantizationConfig) -> None:
    """Check a quantized checkpoint's names, shapes and dtypes against its config (headers only)."""
    problems = []
    for module, (n, k) in linear_shapes(cfg).items():
        g = qc.spec.group(k)
        if k % g or k % qc.spec.pack:
            problems.append(f"{module}: group size {g} / {qc.bits}-bit packing does not divide in_features {k}")
    expected = _expected(cfg, qc)
    head = [n for n in ckpt.tensors if n.startswith("lm_head.") and n != "lm_head.weight"]
    if head:
        problems.append(f"{head[0]}: a quantized lm_head is not supported (it is kept in full precision); "
                        "use a checkpoint whose lm_head is unquantized")
    dense = sorted(n for n in ckpt.tensors if n.startswith("model.layers.") and n.endswith("_proj.weight"))
    if dense:
        problems.append(f"{dense[0]} is stored unquantized (modules_to_not_convert?); layers that mix "
                        f"quantized and full-precision projections are not supported ({len(dense)} such tensors)")
    missing = sorted(n for n, (_, _, req) in expected.items() if req and n not in ckpt.tensors)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    unexpected = sorted(set(ckpt.tensors) - set(expected) - set(dense))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    for name in sorted(set(expected) & set(ckpt.tensors)):
        (shape, dtypes, _), info = expected[name], ckpt.tensors[name]
        if name.endswith("weight_zero_point") and info.dtype == torch.int8:  # older writers: unpacked [N, K/G]
            shape = expected[name.replace("weight_zero_point", "weight_scale")][0]
        if info.shape != shape or info.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            problems.append(f"{name}: expected {want} {list(shape)}, got {str(info.dtype).removeprefix('torch.')} "
                            f"{list(info.shape)}")
    if problems:
        raise ValueError(f"checkpoint {ckpt.model_dir} does not match its config.json ({qc.spec.label}):\n  - "
                         + "\n  - ".join(problems[:12]) + ("\n  (more problems omitted)" if len(problems) > 12 else ""))


def layer_quant(ckpt: Checkpoint, cfg: ModelConfig, qc: QuantizationConfig | None, quantize: str | None = None,
                group: int = DEFAULT_GROUP) -> LayerQuant | None:
    """How this run holds the layers' linear weights; None: full precision. ValueError for
    ``--quantize`` on an already quantized checkpoint, an unknown width or a group that does not fit."""
    gguf = _gguf_quant(ckpt, quantize)
    if gguf is not None:
        return gguf
    if qc is not None:
        if quantize:
            raise ValueError(f"--quantize {quantize}: the checkpoint is already quantized ({qc.spec.label}); "
                             "drop --quantize")
        scales = next(n for n in module_tensors(qc, "model.layers.0.self_attn.q_proj", 8, 8) if "scale" in n)
        act_order = (qc.quant_method == "gptq" and qc.desc_act) or \
            any(n.endswith(".weight_g_idx") for n in ckpt.tensors)
        return LayerQuant(qc.spec, ckpt.tensors[scales].dtype, act_order, qc)
    if not quantize:
        return None
    return rtn_quant(cfg, quantize, group, ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].dtype)


def _gguf_quant(ckpt: Checkpoint, quantize: str | None) -> LayerQuant | None:
    """A GGUF checkpoint's packed layers (``engine.gguf.checkpoint.GGUFCheckpoint.layer_forms``), or None
    for any other checkpoint and for GGUF layers of float types. ValueError for ``--quantize`` on them."""
    native = _gguf_native(ckpt)
    if native is not None:
        if quantize:
            raise ValueError(f"--quantize {quantize}: the GGUF file is already quantized ({native.label}); "
                             "drop --quantize")
        return native
    forms_of = getattr(ckpt, "layer_forms", None)
    forms = forms_of() if forms_of is not None else None
    if forms is None:
        return None
    widest = max(forms.values(), key=lambda t: (t.spec.bits, t.scale_dtype.itemsize, t.spec.mins))
    quant = LayerQuant(widest.spec, widest.scale_dtype,
                       forms=tuple((f, t.spec, t.scale_dtype) for f, t in sorted(forms.items())),
                       loader=lambda prefix, n, k: ckpt.packed_linear(prefix, forms[_fused_of(prefix)]))
    if quantize:
        raise ValueError(f"--quantize {quantize}: the GGUF file is already quantized ({quant.label}); "
                         "drop --quantize")
    return quant


def _gguf_native(ckpt: Checkpoint) -> LayerQuant | None:
    """GGUF layers of the types the kernels decode (K-quants, Q8_0 and the other block-32 types) held as
    the file's blocks (``engine.quant.ggml``), unless ``LAYERSTREAM_GGUF_NATIVE=0`` asks for the canonical
    repacking (to compare the two)."""
    signatures_of = getattr(ckpt, "native_signatures", None)
    if signatures_of is None or os.environ.get("LAYERSTREAM_GGUF_NATIVE", "1") == "0":
        return None
    signatures = signatures_of()
    if signatures is None:
        return None
    spec = QuantSpec(4, 32, True, "gguf", mins=True)  # the nearest canonical form, for what reads only .spec
    return LayerQuant(spec, torch.float32, native=signatures, native_head=ckpt.native_head(),
                      blocks=ckpt.module_blocks)


def _fused_of(prefix: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``mlp.gate_up_proj``."""
    module = prefix.split(".", 3)[3]
    return next(f for f, parts in FUSED_LINEARS.items() if module in parts)


def rtn_quant(cfg: ModelConfig, quantize: str, group: int, file_dtype: torch.dtype) -> LayerQuant:
    """``--quantize int8|int4`` of a full-precision checkpoint whose weights are ``file_dtype``
    (scales keep it when fp16 / bf16, else fp16). ValueError for a group that does not fit."""
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r}: use int8 or int4")
    bits = QUANTIZE[quantize]
    spec = QuantSpec(bits, group, default_sym(bits), "rtn")
    for module, (_, k) in linear_shapes(cfg).items():
        if k % spec.group(k) or k % spec.pack:
            raise ValueError(f"--quant-group {group} does not divide {module}'s in_features {k}; "
                             "choose a group that divides it (or -1: one scale per output row)")
    return LayerQuant(spec, file_dtype if file_dtype in HALF else torch.float16)
