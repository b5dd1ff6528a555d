"""A ``ModelConfig`` from GGUF metadata (llama.cpp's ``{arch}.*`` keys).

llama.cpp writes the hyper-parameters under the architecture's prefix
(``llama.embedding_length``, ``qwen2.attention.head_count_kv``, ...); they are renamed to the
Hugging Face fields here. Whether the output projection is tied and whether q/k/v carry biases
is read off the tensor table, as the metadata does not say; Llama 3 rope scaling is recovered
from the per-frequency divisors llama.cpp stores as ``rope_freqs.weight``. A sliding window
(``{arch}.attention.sliding_window``) holds the context to it, as a config.json's does
(``ModelConfig.attention_window``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from engine.config import ModelConfig
from engine.gguf.reader import GGUFModelFiles

# GGUF general.architecture -> Hugging Face architecture class
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# {arch}.<key> -> ModelConfig field
KEYS = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "context_length": "max_position_embeddings",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
# Llama 3.x rope scaling (low_freq_factor, high_freq_factor, original context): llama.cpp stores only the
# resulting per-frequency divisors (rope_freqs.weight); these are the values every Llama 3.1-3.3 uses
LLAMA3_DEFAULTS = (1.0, 4.0, 8192)


def architecture(files: GGUFModelFiles) -> str:
    """``general.architecture``, checked to be one this engine runs."""
    arch = files.metadata.get("general.architecture")
    if arch is None:
        raise ValueError(f"{files.path} has no general.architecture key: not a llama.cpp model file")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{files.path}: GGUF architecture {arch!r} is not supported; this engine runs "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


def _scalar(value: Any, key: str) -> Any:
    if isinstance(value, list):  # per-layer values (e.g. head_count_kv of hybrid models): uniform only
        if len(set(value)) != 1:
            raise ValueError(f"GGUF key {key} varies per layer ({value[:8]}...); only uniform layers are supported")
        return value[0]
    return value


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if (factor := meta.get(f"{arch}.rope.scaling.factor")) is not None:
        scaling["factor"] = float(factor)
    return scaling  # ModelConfig rejects the types the engine cannot run, by name


def llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 rope scaling (what llama.cpp's converter writes as rope_freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < orig / high, 1.0, torch.where(wavelen > orig / low, factor, medium))


def _rope_from_freqs(files: GGUFModelFiles, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    """The llama3 ``rope_scaling`` whose divisors equal the file's ``rope_freqs.weight`` (None: all ones)."""
    t = files.tensors["rope_freqs.weight"]
    if t.qtype.name != "F32" or t.ne != (head_dim // 2,):
        raise ValueError(f"{files.path}: rope_freqs.weight is {t.qtype.name} {list(t.ne)}, expected F32 "
                         f"[{head_dim // 2}]; the file is corrupt")
    raw = np.fromfile(t.file, dtype="<f4", count=head_dim // 2, offset=t.offset)
    factors = torch.from_numpy(raw.astype(np.float64))
    if torch.allclose(factors, torch.ones_like(factors)):
        return None
    low, high, orig = LLAMA3_DEFAULTS
    orig = int(files.metadata.get(f"{arch}.rope.scaling.original_context_length", orig))
    factor = float(factors.max())
    if torch.allclose(llama3_factors(head_dim, theta, factor, low, high, orig), factors, rtol=1e-4, atol=0):
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": orig}
    raise ValueError(f"{files.path}: rope_freqs.weight holds rope frequency factors that are not Llama 3's "
                     f"scaling (factor {factor}, low/high 1/4, original context {orig}); this rope scaling is "
                     "not supported")


def config_from_gguf(files: GGUFModelFiles, torch_dtype: str) -> ModelConfig:
    """The Hugging Face-style config of the model in ``files`` (see module docstring)."""
    meta, arch = files.metadata, architecture(files)
    missing = [f"{arch}.{k}" for k in REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise ValueError(f"{files.path}: metadata lacks {missing}; the file is incomplete, re-download it")
    kw: dict[str, Any] = {field: _scalar(meta[f"{arch}.{key}"], f"{arch}.{key}")
                          for key, field in KEYS.items() if f"{arch}.{key}" in meta}
    embed = files.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{files.path} has no token_embd.weight tensor; the file is incomplete, re-download it")
    kw["vocab_size"] = embed.shape[0]
    if (n := meta.get(f"{arch}.vocab_size")) is not None and int(n) != embed.shape[0]:
        raise ValueError(f"{files.path}: {arch}.vocab_size is {n} but token_embd.weight has {embed.shape[0]} rows; "
                         "the file is corrupt")
    if window := meta.get(f"{arch}.attention.sliding_window"):  # llama.cpp's: attention within it, every layer
        kw["sliding_window"] = int(_scalar(window, f"{arch}.attention.sliding_window"))
        kw["layer_types"] = ("sliding_attention",) * int(kw["num_hidden_layers"])
    rope_scaling = _rope_scaling(meta, arch)
    if rope_scaling is None and "rope_freqs.weight" in files.tensors:
        head_dim = kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
        rope_scaling = _rope_from_freqs(files, arch, head_dim, float(kw.get("rope_theta", 10000.0)))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return ModelConfig(
        model_type=arch,
        architectures=(ARCHITECTURES[arch],),
        tie_word_embeddings="output.weight" not in files.tensors,
        attention_bias="blk.0.attn_q.bias" in files.tensors,
        rope_scaling=rope_scaling,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        torch_dtype=torch_dtype,
        **kw,
    )
