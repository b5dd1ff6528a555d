"""Synthetic random-weight checkpoints in the exact Hugging Face layout of real models.

The library behind ``python -m tools.synth`` (and the embedded default model):

    python -m tools.synth --preset qwen2.5-7b --out DIR [--dtype bf16|fp16|fp32] [--seed N]
                          [--layers N] [--device cpu|cuda] [--force] [--max-shard-bytes N]

Writes config.json, generation_config.json, model.safetensors (or HF-style shards
model-0000K-of-0000N.safetensors + model.safetensors.index.json above the shard cap),
tokenizer.json and tokenizer_config.json.  Each tensor is drawn from a generator seeded with
(seed, tensor name), so values do not depend on sharding or on --layers (they do depend on the
device: CPU and CUDA generators differ).  Shards are streamed tensor by tensor; the output is
built in a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.synth.presets import FAMILIES, GENERATION_OVERRIDES, PRESET_FAMILY, PRESETS, is_tiny, resolve_preset
from engine.synth.tokenizer import SynthTokenizer, build_tokenizer

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # HF's default max_shard_size "5GB"
INIT_STD = 0.02
# short name -> (torch dtype, safetensors dtype, config.json name)
DTYPES: dict[str, tuple[torch.dtype, str, str]] = {
    "bf16": (torch.bfloat16, "BF16", "bfloat16"),
    "fp16": (torch.float16, "F16", "float16"),
    "fp32": (torch.float32, "F32", "float32"),
}
# every tensor dtype a checkpoint may hold: the float ones plus the packed codes / shapes of quantized formats
TENSOR_DTYPES = {**DTYPES, "i32": (torch.int32, "I32", "int32"), "i64": (torch.int64, "I64", "int64")}


class SynthError(Exception):
    """A user-facing error (bad arguments, occupied output directory); the CLI exits 2."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype (a key of ``DTYPES``) of one checkpoint tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "bf16"

    @property
    def numel(self) -> int:
        """Number of elements."""
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes of the stored tensor."""
        return self.numel * TENSOR_DTYPES[self.dtype][0].itemsize


def _layer_specs(cfg: dict[str, Any], i: int, dtype: str) -> list[TensorSpec]:
    """Tensors of decoder layer ``i``, in Hugging Face module order."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = cfg["model_type"] == "qwen2" or attn_bias
    p = f"model.layers.{i}."
    specs: list[tuple[str, tuple[int, ...]]] = []
    for proj, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
        specs.append((f"{p}self_attn.{proj}_proj.weight", (rows, h)))
        if qkv_bias:
            specs.append((f"{p}self_attn.{proj}_proj.bias", (rows,)))
    specs.append((f"{p}self_attn.o_proj.weight", (h, heads * hd)))
    if attn_bias:
        specs.append((f"{p}self_attn.o_proj.bias", (h,)))
    if cfg["model_type"] == "qwen3":
        specs += [(f"{p}self_attn.q_norm.weight", (hd,)), (f"{p}self_attn.k_norm.weight", (hd,))]
    for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
        specs.append((f"{p}mlp.{proj}_proj.weight", shape))
        if cfg.get("mlp_bias", False):
            specs.append((f"{p}mlp.{proj}_proj.bias", (shape[0],)))
    specs += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    return [TensorSpec(n, s, dtype) for n, s in specs]


def tensor_specs(config: dict[str, Any], dtype: str = "bf16") -> list[TensorSpec]:
    """All tensors of a checkpoint for an HF ``config.json`` dict, with HF names and shapes."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), dtype)]
    for i in range(config["num_hidden_layers"]):
        specs += _layer_specs(config, i, dtype)
    specs.append(TensorSpec("model.norm.weight", (h,), dtype))
    if not config.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, h), dtype))
    return specs


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors into consecutive shards of at most ``max_shard_bytes`` (HF's rule:
    a tensor larger than the cap gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from the global seed and the tensor name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_tensor(spec: TensorSpec, seed: int, device: str = "cpu") -> torch.Tensor:
    """Random tensor for ``spec`` on the CPU: N(1, 0.02) for norm weights, N(0, 0.02) otherwise."""
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, spec.name))
    t = torch.empty(spec.shape, dtype=torch.float32, device=device)
    t.normal_(1.0 if spec.name.endswith("norm.weight") else 0.0, INIT_STD, generator=gen)
    return t.to(DTYPES[spec.dtype][0]).cpu()


def write_safetensors(path: Path, specs: list[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                      on_tensor: Callable[[TensorSpec], None] = lambda s: None) -> None:
    """Stream a safetensors file tensor by tensor (only one tensor in memory at a time)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": TENSOR_DTYPES[s.dtype][1], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for s in specs:
            t = make(s)
            if tuple(t.shape) != s.shape or t.dtype != TENSOR_DTYPES[s.dtype][0]:
                raise ValueError(f"{s.name}: got {tuple(t.shape)} {t.dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            on_tensor(s)


def build_config(preset: str, dtype: str = "bf16", layers: int | None = None,
                 tokenizer: SynthTokenizer | None = None) -> dict[str, Any]:
    """config.json for a preset: dtype and layer count applied, tiny vocab sized from the tokenizer."""
    cfg = copy.deepcopy(PRESETS[preset])
    if is_tiny(preset):
        tok = tokenizer or build_tokenizer(PRESET_FAMILY[preset], relocate=True)
        cfg["vocab_size"] = -(-tok.size // 64) * 64
        tok.remap_ids(cfg)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cfg["torch_dtype"] = DTYPES[dtype][2]
    return cfg


def generation_config(preset: str, tokenizer: SynthTokenizer) -> dict[str, Any]:
    """generation_config.json for a preset, token ids mapped to ``tokenizer``'s layout."""
    gen = {**FAMILIES[PRESET_FAMILY[preset]]["generation"], **GENERATION_OVERRIDES.get(preset, {})}
    return tokenizer.remap_ids(gen)


def _check_args(preset: str, dtype: str, layers: int | None, device: str, max_shard_bytes: int) -> str:
    """Validate arguments; returns the canonical preset name."""
    name = resolve_preset(preset)
    if name is None:
        raise SynthError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise SynthError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if layers is not None and layers < 1:
        raise SynthError("--layers must be >= 1")
    if max_shard_bytes < 1:
        raise SynthError("--max-shard-bytes must be >= 1")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SynthError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise SynthError(f"device {device!r} requested but CUDA is not available")
    return name


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output unless ``force``; even with ``force``, replace only a directory
    that holds a model (a config.json or a .gguf file, e.g. an earlier synthesis): a mistyped --out (a
    file, a home directory) must never be deleted."""
    occupied = out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()))
    if not occupied:
        return
    if not force:
        raise SynthError(f"output {out} exists and is not empty; use --force to replace it (a model directory only)")
    if out.is_symlink() or not out.is_dir() or not ((out / "config.json").is_file() or any(out.glob("*.gguf"))):
        what = ("a file" if out.is_file() or out.is_symlink()
                else "a directory that holds no model (no config.json or .gguf)")
        raise SynthError(f"output {out} is {what}: --force replaces only a model directory; remove it yourself "
                         "or choose another --out")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write pretty JSON like Hugging Face does."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_weights(tmp: Path, specs: list[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                   max_shard_bytes: int, progress: bool) -> None:
    """Write the safetensors file(s) and, when sharded, the index."""
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    total = sum(s.nbytes for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="tensors") as bar:
        for fname, shard in zip(names, shards):
            write_safetensors(tmp / fname, shard, make, lambda s: bar.update(s.nbytes))
    if n > 1:
        weight_map = {s.name: fname for fname, shard in zip(names, shards) for s in shard}
        index = {"metadata": {"total_parameters": sum(s.numel for s in specs), "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(tmp / "model.safetensors.index.json", index)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to ``out`` (replacing what is there)."""
    old = out.parent / f".{out.name}.synth-old-{os.getpid()}"
    if out.is_dir() and not out.is_symlink():
        out.rename(old)
    elif out.exists() or out.is_symlink():
        out.unlink()
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def _quantized(cfg: dict[str, Any], dtype: str, quant: str, seed: int, device: str):
    """(specs, make, config) of the ``quant`` variant of a checkpoint with config ``cfg``."""
    from engine.synth.quant import QUANT_KINDS, QuantTensors, apply_quant

    if quant not in QUANT_KINDS:
        raise SynthError(f"unknown --quant {quant!r}; choose from {', '.join(QUANT_KINDS)}")
    try:
        qcfg = apply_quant(cfg, quant)
    except ValueError as e:
        raise SynthError(f"--quant {quant}: {e}") from e
    qt = QuantTensors(quant, qcfg, tensor_specs(qcfg, dtype), seed, device)
    return qt.specs, qt.make, qcfg


def synthesize(preset: str, out: Path, dtype: str = "bf16", seed: int = 0, layers: int | None = None,
               device: str = "cpu", force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               progress: bool = False, quant: str | None = None, weights: bool = True) -> Path:
    """Write a random-weight checkpoint of ``preset`` (name or HF repo id) to ``out``.

    ``weights=False`` writes only the config, generation config and tokenizer files (what
    ``engine.gguf.random_writer`` needs to write a GGUF with random blocks).

    ``quant`` (one of ``engine.synth.quant.QUANT_KINDS``) writes the layers' projections quantized,
    with the names, layout and ``quantization_config`` of that format's published checkpoints (its
    unquantized tensors in the format's dtype, whatever ``dtype`` says).

    Raises ``SynthError`` for bad arguments or a non-empty ``out`` without ``force``; nothing is
    written then.  The checkpoint appears at ``out`` only once it is complete.  Returns ``out``.
    """
    name = _check_args(preset, dtype, layers, device, max_shard_bytes)
    out = Path(out)
    check_out(out, force)
    tok = build_tokenizer(PRESET_FAMILY[name], relocate=is_tiny(name))
    cfg = build_config(name, dtype, layers, tok)
    specs, make = tensor_specs(cfg, dtype), (lambda s: make_tensor(s, seed, device))
    if quant is not None:
        specs, make, cfg = _quantized(cfg, dtype, quant, seed, device)
    if cfg["vocab_size"] < tok.size:
        raise SynthError(f"vocab_size {cfg['vocab_size']} < tokenizer size {tok.size}")
    tok.fill(cfg["vocab_size"])  # every id the random weights may pick decodes to visible text
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.synth-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", generation_config(name, tok))
        tok.write(tmp)
        if weights:
            _write_weights(tmp, specs, make, max_shard_bytes, progress)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
