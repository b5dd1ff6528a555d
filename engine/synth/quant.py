"""Synthetic quantized checkpoints: the tensor names, layouts and ``quantization_config`` of published ones.

``--quant`` kinds (what they imitate):

* ``awq``: AutoAWQ gemm, as ``Qwen/Qwen2.5-*-Instruct-AWQ``: int4, group 128, zero points; ``qweight`` /
  ``qzeros`` int32 ``[in, out/8]`` / ``[in/128, out/8]`` packed along the outputs, ``scales`` fp16.
* ``gptq`` / ``gptq8``: GPTQ v1, as ``Qwen/Qwen2.5-*-Instruct-GPTQ-Int4`` / ``-Int8``: symmetric, group 128,
  ``desc_act: false``; ``qweight`` ``[in/P, out]`` packed along the inputs, ``qzeros`` (minus one) ``[in/128, out/P]``,
  ``scales`` fp16, ``g_idx``.
* ``ct-int4``: compressed-tensors ``pack-quantized`` W4A16 (llm-compressor): int4 symmetric, group 128.
* ``int8``: compressed-tensors ``pack-quantized`` W8A16: int8 symmetric, one scale per output channel.

The decoder layers' projections are quantized; embeddings, norms, biases and lm_head stay in the
format's published dtype (fp16 for AWQ / GPTQ, bf16 for compressed-tensors). Codes are random and
symmetric around a mid-range zero point (a code of 0 becomes the zero point), and the scales make the
weights' spread close to the full-precision synthesizer's (std ~0.02). Uniform codes 0 .. 2^bits - 1 put
every weight half a step off, with the same sign everywhere; through the residual stream's all-ones
direction that grew layer by layer (the 7B AWQ's residual passed fp16's 65,504 at layer 26, and its
logits were all NaN in fp16, the format's dtype); real checkpoints are centred. Qwen2.5-72B's AWQ / GPTQ
checkpoints pad ``intermediate_size`` from 29568 to 29696 (so that it splits into 8 tensor-parallel
shards of whole groups); so do these.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from engine.synth.writer import INIT_STD, TensorSpec, make_tensor, tensor_seed

QUANT_KINDS = ("awq", "gptq", "gptq8", "ct-int4", "int8")
# kind -> (bits, group size (-1: per channel), dense dtype)
_KIND = {"awq": (4, 128, "fp16"), "gptq": (4, 128, "fp16"), "gptq8": (8, 128, "fp16"),
         "ct-int4": (4, 128, "bf16"), "int8": (8, -1, "bf16")}
PADDED_INTERMEDIATE = {29568: 29696}  # Qwen2.5-72B -> its published AWQ / GPTQ checkpoints
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dense_dtype(kind: str) -> str:
    """The dtype the format's checkpoints keep their unquantized tensors in."""
    return _KIND[kind][2]


def group_for(kind: str, cfg: dict[str, Any]) -> int:
    """The format's group size, or the largest of 64 / 32 dividing every input dim (tiny presets)."""
    bits, group, _ = _KIND[kind]
    ins = {cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * _head_dim(cfg)}
    for g in (group, 64, 32):
        if g == -1 or all(k % g == 0 for k in ins):
            return g
    raise ValueError(f"no group size of 128, 64 or 32 divides the input dims {sorted(ins)}")


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def quant_config(kind: str, group: int) -> dict[str, Any]:
    """``quantization_config`` as the published checkpoints of ``kind`` write it."""
    bits = _KIND[kind][0]
    if kind == "awq":
        return {"bits": 4, "group_size": group, "modules_to_not_convert": None, "quant_method": "awq",
                "version": "gemm", "zero_point": True}
    if kind in ("gptq", "gptq8"):
        return {"bits": bits, "damp_percent": 0.01, "desc_act": False, "group_size": group,
                "modules_in_block_to_quantize": None, "quant_method": "gptq", "sym": True, "true_sequential": True}
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "group_size": None if group == -1 else group,
               "strategy": "channel" if group == -1 else "group", "dynamic": False, "actorder": None,
               "observer": "minmax"}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def apply_quant(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """``config.json`` of the quantized checkpoint: padding, dtype and ``quantization_config``."""
    out = copy.deepcopy(cfg)
    if kind in ("awq", "gptq", "gptq8"):
        out["intermediate_size"] = PADDED_INTERMEDIATE.get(out["intermediate_size"], out["intermediate_size"])
    out["torch_dtype"] = {"fp16": "float16", "bf16": "bfloat16"}[dense_dtype(kind)]
    out["quantization_config"] = quant_config(kind, group_for(kind, out))
    return out


def _module_specs(kind: str, prefix: str, n: int, k: int, g: int) -> list[TensorSpec]:
    bits, _, dense = _KIND[kind]
    per, groups = 32 // bits, k // (k if g == -1 else g)
    if kind == "awq":
        shapes = [("qweight", (k, n // 8), "i32"), ("qzeros", (groups, n // 8), "i32"), ("scales", (groups, n), dense)]
    elif kind in ("gptq", "gptq8"):
        shapes = [("qweight", (k // per, n), "i32"), ("qzeros", (groups, n // per), "i32"),
                  ("scales", (groups, n), dense), ("g_idx", (k,), "i32")]
    else:
        shapes = [("weight_packed", (n, k // per), "i32"), ("weight_scale", (n, groups), dense),
                  ("weight_shape", (2,), "i64")]
    return [TensorSpec(f"{prefix}.{name}", shape, dt) for name, shape, dt in shapes]


class QuantTensors:
    """The tensors of a quantized checkpoint built over a full-precision one's ``dense_specs``:
    ``specs`` (each layer projection replaced by its quantized tensors, the rest in the format's
    dense dtype) and ``make(spec)``, deterministic contents seeded by tensor name."""

    def __init__(self, kind: str, cfg: dict[str, Any], dense_specs: list[TensorSpec], seed: int,
                 device: str = "cpu") -> None:
        self.kind, self.seed, self.device = kind, seed, device
        self.bits = _KIND[kind][0]
        self.group = group_for(kind, cfg)
        self.shapes: dict[str, tuple[int, int]] = {}  # module prefix -> (N, K)
        self.specs: list[TensorSpec] = []
        for s in dense_specs:
            if s.name.startswith("model.layers.") and s.name.endswith(tuple(f"{p}.weight" for p in _PROJ)):
                prefix = s.name.removesuffix(".weight")
                self.shapes[prefix] = (s.shape[0], s.shape[1])
                self.specs += _module_specs(kind, prefix, s.shape[0], s.shape[1], self.group)
            else:
                self.specs.append(TensorSpec(s.name, s.shape, dense_dtype(kind)))

    def make(self, spec: TensorSpec) -> torch.Tensor:
        """Random codes, mid-range zero points, scales giving weights of std ~INIT_STD, the group of
        each input for ``g_idx``, (N, K) for ``weight_shape``; dense tensors as the synthesizer's."""
        prefix, name = spec.name.rsplit(".", 1)
        bits = self.bits
        gen = torch.Generator(device="cpu").manual_seed(tensor_seed(self.seed, spec.name))
        if name in ("qweight", "weight_packed"):
            return _code_words(spec.shape, bits, gen)
        if name == "qzeros":  # every zero mid-range; GPTQ v1 stores it minus one
            word = sum(((1 << (bits - 1)) - (self.kind != "awq")) << (bits * i) for i in range(32 // bits))
            return torch.full(spec.shape, word - (1 << 32) if word >= 1 << 31 else word, dtype=torch.int32)
        if name in ("scales", "weight_scale"):
            half = 1 << (bits - 1)  # std of the codes around the zero point (_code_words)
            spread = ((half - 1) * (2 * half - 1) / 6) ** 0.5
            scale = torch.empty(spec.shape).uniform_(0.8, 1.2, generator=gen) * (INIT_STD / spread)
            return scale.to(torch.float16 if spec.dtype == "fp16" else torch.bfloat16)
        if name == "g_idx":
            k = self.shapes[prefix][1]
            return torch.arange(k, dtype=torch.int32) // (k if self.group == -1 else self.group)
        if name == "weight_shape":
            return torch.tensor(self.shapes[prefix], dtype=torch.int64)
        return make_tensor(spec, self.seed, self.device)



def _code_words(shape: tuple[int, ...], bits: int, gen: torch.Generator) -> torch.Tensor:
    """int32 words of ``shape``, each holding 32 / ``bits`` independent codes, symmetric around the mid-range
    zero point 2^(bits-1) (mean exactly there): uniform random bits, then every all-zero code set to the
    zero point, so codes 1 .. 2^bits - 1 have 1/2^bits each and the zero point twice that."""
    word = torch.randint(0, 1 << 32, shape, generator=gen, dtype=torch.int64)
    low = sum(1 << (bits * i) for i in range(32 // bits))  # the lowest bit of every code
    any_bit = word
    for b in range(1, bits):
        any_bit = any_bit | (word >> b)
    zero = ~any_bit & low  # 1 at the lowest bit of each all-zero code
    word = word | (zero << (bits - 1))
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
