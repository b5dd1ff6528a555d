"""``config.json``'s ``quantization_config``: detection, validation and the per-module loader dispatch.

Supported (weight-only, int4 / int8, group-wise or per channel):

* ``quant_method: awq`` with ``version: gemm`` (4 bits; ``zero_point`` true or false),
* ``quant_method: gptq`` (4 or 8 bits, ``sym`` true or false, ``desc_act``; ``checkpoint_format``
  ``gptq`` (v1, zeros stored minus one) or ``gptq_v2``),
* ``quant_method: compressed-tensors`` with ``format: pack-quantized`` and integer weight schemes in
  ``config_groups`` (all groups with the same weight arguments; no activation quantization).

Which linear modules are quantized is read from the checkpoint's tensor names (``qweight`` /
``weight_packed`` present), so ``modules_to_not_convert`` / ``ignore`` modules (and lm_head,
embeddings, norms, biases) load in their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.quant.awq import load_awq
from engine.quant.ct import load_ct
from engine.quant.gptq import load_gptq
from engine.quant.spec import QuantSpec, QuantWeight
from engine.quant.tensors import Getter

METHODS = ("awq", "gptq", "compressed-tensors")
_MARKER = {"awq": "qweight", "gptq": "qweight", "compressed-tensors": "weight_packed"}


@dataclass(frozen=True)
class QuantizationConfig:
    """The fields of ``quantization_config`` that loading needs (Hugging Face names); ``bits`` /
    ``group_size`` / ``sym`` of compressed-tensors come from its ``config_groups`` weights."""

    quant_method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)

    @property
    def spec(self) -> QuantSpec:
        """The canonical spec the modules of this checkpoint load as."""
        return QuantSpec(self.bits, self.group_size, self.sym, self.quant_method)

    def marker(self, prefix: str) -> str:
        """The tensor whose presence marks module ``prefix`` as quantized."""
        return f"{prefix}.{_MARKER[self.quant_method]}"


def _bits(value: Any, allowed: tuple[int, ...], method: str) -> int:
    if value not in allowed:
        raise ValueError(f"quantization_config: {method} with bits={value!r} is not supported "
                         f"(supported: {', '.join(map(str, allowed))})")
    return int(value)


def _group(value: Any) -> int:
    if value is None or (value == -1 and not isinstance(value, bool)):
        return -1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"quantization_config: group_size must be a positive integer or -1, got {value!r}")
    return value


def _flag(qc: dict[str, Any], key: str, default: bool) -> bool:
    value = qc.get(key)
    if value is None:  # absent or null: the format's default
        return default
    if not isinstance(value, bool):
        raise ValueError(f"quantization_config: {key} should be true or false, got {value!r}")
    return value


def _names(qc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = qc.get(key) or ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"quantization_config: {key} should be a list of module names, got {value!r}")
    return tuple(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"quantization_config: {what} should be an object, got {value!r}")
    return value


def _awq(qc: dict[str, Any]) -> QuantizationConfig:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config: AWQ version {version!r} is not supported (supported: gemm)")
    return QuantizationConfig("awq", _bits(qc.get("bits", qc.get("w_bit")), (4,), "awq"),
                              _group(qc.get("group_size", qc.get("q_group_size", 128))),
                              not _flag(qc, "zero_point", True),
                              modules_to_not_convert=_names(qc, "modules_to_not_convert"))


def _gptq(qc: dict[str, Any]) -> QuantizationConfig:
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not supported "
                         "(supported: gptq, gptq_v2)")
    return QuantizationConfig("gptq", _bits(qc.get("bits"), (4, 8), "gptq"), _group(qc.get("group_size", 128)),
                              _flag(qc, "sym", True), _flag(qc, "desc_act", False), fmt,
                              _names(qc, "modules_to_not_convert"))


def _ct(qc: dict[str, Any]) -> QuantizationConfig:
    groups = _object(qc.get("config_groups") or {}, "config_groups")
    if not groups:
        raise ValueError("quantization_config: compressed-tensors without config_groups")
    schemes = []
    for name, scheme in groups.items():
        scheme = _object(scheme, f"config_groups.{name}")
        fmt = scheme.get("format") or qc.get("format")
        w = _object(scheme.get("weights") or {}, f"config_groups.{name}.weights")
        if fmt != "pack-quantized":
            raise ValueError(f"quantization_config: compressed-tensors format {fmt!r} in {name} is not "
                             "supported (supported: pack-quantized)")
        if scheme.get("input_activations") or scheme.get("output_activations") or w.get("dynamic"):
            raise ValueError(f"quantization_config: {name} quantizes activations; only weight-only is supported")
        if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
            raise ValueError(f"quantization_config: {name} weights type={w.get('type')!r} strategy="
                             f"{w.get('strategy')!r} are not supported (supported: int, group or channel)")
        group = -1 if w["strategy"] == "channel" else _group(w.get("group_size"))
        schemes.append((_bits(w.get("num_bits"), (4, 8), "compressed-tensors"), group, _flag(w, "symmetric", False)))
    if len(set(schemes)) > 1:
        raise ValueError(f"quantization_config: config_groups with different weight schemes {sorted(set(schemes))} "
                         "are not supported")
    bits, group, sym = schemes[0]
    return QuantizationConfig("compressed-tensors", bits, group, sym,
                              modules_to_not_convert=_names(qc, "ignore"))


def parse_quantization_config(config: dict[str, Any]) -> QuantizationConfig | None:
    """The checkpoint's quantization, or None for a full-precision one. ValueError names an
    unsupported ``quant_method``, bit width, version / format or scheme."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config should be an object (a JSON dict with quant_method, bits ...), "
                         f"got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    parse = {"awq": _awq, "gptq": _gptq, "compressed-tensors": _ct}.get(method)
    if parse is None:
        raise ValueError(f"quantization_config: quant_method {method!r} is not supported "
                         f"(supported: {', '.join(METHODS)})")
    return parse(qc)


def load_quant_linear(qc: QuantizationConfig, prefix: str, get: Getter, out_features: int,
                      in_features: int) -> QuantWeight:
    """Read module ``prefix``'s tensors through ``get`` and convert them to the canonical layout
    (host tensors; repacked, never dequantized). ValueError names a missing or mismatched tensor."""
    if qc.quant_method == "awq":
        return load_awq(prefix, get, out_features, in_features, qc.spec)
    if qc.quant_method == "gptq":
        return load_gptq(prefix, get, out_features, in_features, qc.spec, qc.checkpoint_format == "gptq_v2")
    return load_ct(prefix, get, out_features, in_features, qc.spec)
