"""Quantized-checkpoint writers for the tests, independent of engine/quant.

AWQ and GPTQ are packed here from their published layouts (the known-word tests in
tests/test_quant_formats.py pin the bit order); compressed-tensors checkpoints are packed by the
``compressed-tensors`` package itself. ``quantize_model_dir`` turns a full-precision tiny model
directory into a quantized one and returns the dequantized weights a reference model must use.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _wrap32(word: torch.Tensor) -> torch.Tensor:
    return ((word + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """Published AWQ gemm packing: 8 codes along the last dim per int32, nibble i = column ORDER[i]."""
    rows, cols = codes.shape
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    return _wrap32(sum(c[:, :, AWQ_ORDER[i]] << (4 * i) for i in range(8)))


def gptq_pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Published GPTQ packing along dim 0: word row i holds rows i*P .. i*P+P-1, row i*P+j at bits j*bits."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(codes.shape[0] // per, per, *codes.shape[1:])
    return _wrap32(sum(c[:, j] << (bits * j) for j in range(per)))


def minmax_quantize(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool):
    """Per-(row, group) min/max quantization (groups given by g_idx): codes [N, K], scales / zeros
    [N, groups] (scales fp16, zeros integer), and the fp32 dequantized weight."""
    top = (1 << bits) - 1
    n = w.shape[0]
    scales, zeros = torch.empty(n, groups), torch.empty(n, groups)
    for g in range(groups):
        cols = w[:, g_idx == g].float()
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            scales[:, g] = torch.maximum(-lo, hi) / ((top + 1) // 2 - 1)
            zeros[:, g] = (top + 1) // 2
        else:
            scales[:, g] = (hi - lo) / top
            zeros[:, g] = torch.round(-lo / scales[:, g].half().float())
    scales = scales.half()
    s, z = scales.float()[:, g_idx], zeros[:, g_idx]
    codes = (torch.round(w.float() / s) + z).clamp(0, top).long()
    return codes, scales, zeros.long(), (codes - z) * s


def _ct_module(w: torch.Tensor, bits: int, group: int, sym: bool):
    n, k = w.shape
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, group_size=group, strategy="group")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    _, scales, zeros, _ = minmax_quantize(w, torch.arange(k) // group, k // group, bits, sym)
    sd = {"weight": w.float(), "weight_scale": scales}
    if not sym:
        sd["weight_zero_point"] = (zeros - (1 << (bits - 1))).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(sd, scheme)
    q = unpack_from_int32(packed["weight_packed"], bits, torch.Size((n, k))).float()  # signed values
    zp = 0.0 if sym else (zeros - (1 << (bits - 1))).float().repeat_interleave(group, 1)
    return packed, (q - zp) * scales.float().repeat_interleave(group, 1), scheme


def _gptq_modules(ws: list[torch.Tensor], bits: int, group: int, sym: bool, act_order: bool, seed: int):
    k = ws[0].shape[1]
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)  # one order for the fused parts (same inputs)
    out = []
    for w in ws:
        codes, scales, zeros, deq = minmax_quantize(w, g_idx.long(), k // group, bits, sym)
        stored = (zeros - 1) % (1 << bits)  # v1: zero points minus one
        out.append(({"qweight": gptq_pack_rows(codes.T.contiguous(), bits),
                     "qzeros": gptq_pack_rows(stored, bits).T.contiguous(), "scales": scales.T.contiguous(),
                     "g_idx": g_idx.clone()}, deq))
    return out


def _awq_module(w: torch.Tensor, group: int):
    k = w.shape[1]
    codes, scales, zeros, deq = minmax_quantize(w, torch.arange(k) // group, k // group, 4, False)
    return {"qweight": awq_pack(codes.T.contiguous()), "qzeros": awq_pack(zeros.T.contiguous()),
            "scales": scales.T.contiguous()}, deq


FORMATS = ("awq", "gptq-actorder", "gptq8", "ct-int4", "ct-int8-asym")


def quantize_model_dir(src: Path, dst: Path, fmt: str, group: int = 32) -> dict[str, torch.Tensor]:
    """Write ``dst``: ``src`` with every decoder-layer projection quantized in format ``fmt`` (see
    FORMATS); returns {HF weight name: fp32 dequantized weight} for the reference model."""
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    deq: dict[str, torch.Tensor] = {}
    ct_scheme = None
    for i in range(cfg["num_hidden_layers"]):
        for j, parts in enumerate(FUSED):
            names = [f"model.layers.{i}.{p}" for p in parts]
            ws = [sd.pop(f"{n}.weight") for n in names]
            if fmt == "awq":
                mods = [_awq_module(w, group) for w in ws]
            elif fmt.startswith("gptq"):
                bits = 8 if fmt == "gptq8" else 4
                mods = _gptq_modules(ws, bits, group, sym=fmt != "gptq8", act_order=fmt == "gptq-actorder",
                                     seed=10 * i + j)
            else:
                packed = [_ct_module(w, 8 if "int8" in fmt else 4, group, sym=fmt == "ct-int4") for w in ws]
                ct_scheme = packed[0][2]
                mods = [(p, d) for p, d, _ in packed]
            for n, (tensors, d) in zip(names, mods):
                sd.update({f"{n}.{t}": v for t, v in tensors.items()})
                deq[f"{n}.weight"] = d
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["quantization_config"] = _config(fmt, group, ct_scheme)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


def _config(fmt: str, group: int, ct_scheme) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True,
                "modules_to_not_convert": None}
    if fmt.startswith("gptq"):
        return {"quant_method": "gptq", "bits": 8 if fmt == "gptq8" else 4, "group_size": group,
                "sym": fmt != "gptq8", "desc_act": fmt == "gptq-actorder", "checkpoint_format": "gptq"}
    return QuantizationConfig(config_groups={"group_0": ct_scheme}, format="pack-quantized",
                              ignore=["lm_head"]).model_dump()
