"""Write a Hugging Face checkpoint directory as a GGUF file with llama.cpp's layout.

For tests (a tiny transformers model as GGUF, read back by both transformers and the engine)
and ``python -m tools.synth --format gguf --gguf-from-floats``; the metadata and type choice here
are shared with ``engine.gguf.random_writer`` (random blocks, the synth default). What llama.cpp's
converter and ``llama-quantize`` produce is reproduced where it matters to a reader:

* metadata under ``{arch}.*`` and ``tokenizer.*`` (byte-level BPE ``gpt2`` vocabulary from
  ``tokenizer.json``, token kinds, merges, chat template, BOS/EOS);
* GGUF tensor names, llama's Q/K rows in llama.cpp's pair order, 1-D tensors in F32, Llama 3
  rope scaling as ``rope_freqs.weight`` divisors;
* the per-tensor types of a file type (:data:`FILE_TYPES`): e.g. Q4_K_M keeps ``attn_v`` and
  ``ffn_down`` of some layers and ``output`` in Q6_K, the rest in Q4_K.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as QT, GGUFWriter, LlamaFileType

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.gguf.config import llama3_factors
from engine.gguf.dequant import block_geometry
from engine.gguf.names import GLOBAL, LAYER, permute_rows, permuted_heads
from engine.gguf.quantize import quantize
from engine.generation_defaults import from_dir

log = logging.getLogger(__name__)

FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
              "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
              "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
              "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": LlamaFileType.MOSTLY_Q6_K}
_HF_TO_GGUF = {v: k for k, v in GLOBAL.items()} | {v: k for k, v in LAYER.items()}
_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}  # pre-tokenizer split of the synth tokenizers
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}  # llama-quantize's, for rows % 256 != 0


def gguf_name(hf: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight`` (inverse of ``names.hf_name``)."""
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    parts = hf.split(".", 3)
    assert parts[:2] == ["model", "layers"] and parts[3] in _HF_TO_GGUF, hf
    return f"blk.{parts[2]}.{_HF_TO_GGUF[parts[3]]}"


def _more_bits(layer: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def tensor_type(file_type: str, gguf: str, shape: tuple[int, ...], n_layers: int) -> QT:
    """The ggml type a tensor gets in a file of ``file_type`` (1-D tensors: F32)."""
    if len(shape) == 1 or file_type == "F32":
        return QT.F32
    base = {"F16": QT.F16, "BF16": QT.BF16, "Q8_0": QT.Q8_0, "Q4_0": QT.Q4_0, "Q4_1": QT.Q4_1, "Q5_0": QT.Q5_0,
            "Q5_1": QT.Q5_1, "Q4_K_M": QT.Q4_K, "Q5_K_M": QT.Q5_K, "Q6_K": QT.Q6_K}[file_type]
    if file_type in ("Q4_K_M", "Q5_K_M"):
        layer = int(gguf.split(".")[1]) if gguf.startswith("blk.") else -1
        if gguf == "output.weight" or (layer >= 0 and ("attn_v" in gguf or "ffn_down" in gguf)
                                       and _more_bits(layer, n_layers)):
            base = QT.Q6_K
    if shape[-1] % block_geometry(base)[0]:  # rows not a whole number of 256-value blocks: llama.cpp's fallbacks
        base = _FALLBACK.get(base, QT.Q8_0) if shape[-1] % 32 == 0 else QT.F16
    return base


def _tokenizer_kv(w: GGUFWriter, model_dir: Path, cfg: ModelConfig) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    conf_path = model_dir / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    model = tok["model"]
    assert model["type"] == "BPE", "only byte-level BPE tokenizers are written"
    tokens: list[str | None] = [None] * cfg.vocab_size
    types = [UNUSED] * cfg.vocab_size
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_PRE[cfg.model_type])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        value = conf.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            add(ids[value])
    w.add_add_bos_token(bool(conf.get("add_bos_token", False)))
    if isinstance(conf.get("chat_template"), str):
        w.add_chat_template(conf["chat_template"])


def _sampling_kv(w: GGUFWriter, model_dir: Path) -> None:
    """generation_config.json's temperature, top_k, top_p and min_p (as the server reads them:
    ``engine.generation_defaults``) as ``general.sampling.*``, as llama.cpp's converter copies them (gguf-py's
    ``Metadata.load``; it reads no HF repetition_penalty)."""
    gen = from_dir(model_dir)
    for key, add in (("temperature", w.add_sampling_temp), ("top_k", w.add_sampling_top_k),
                     ("top_p", w.add_sampling_top_p), ("min_p", w.add_sampling_min_p)):
        if key in gen:
            add(gen[key])


def _model_kv(w: GGUFWriter, cfg: ModelConfig, file_type: str) -> None:
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.attention_window:  # llama.cpp's key: every layer's window (a Qwen2 window from a layer on is wider)
        w.add_sliding_window(cfg.attention_window)
    w.add_file_type(int(FILE_TYPES[file_type]))
    w.add_quantization_version(2)


def _rope_freqs(w: GGUFWriter, cfg: ModelConfig) -> None:
    """Llama 3 rope scaling as llama.cpp's converter stores it: per-frequency divisors (rope_freqs.weight)."""
    scaling = cfg.rope_scaling or {}
    if cfg.model_type != "llama" or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return
    orig = int(scaling["original_max_position_embeddings"])
    w.add_uint32(f"{cfg.model_type}.rope.scaling.original_context_length", orig)
    factors = llama3_factors(cfg.head_dim, cfg.rope_theta, scaling["factor"], scaling["low_freq_factor"],
                             scaling["high_freq_factor"], orig)
    w.add_tensor("rope_freqs.weight", factors.numpy().astype("float32"))


def _add_tensors(w: GGUFWriter, ckpt: Checkpoint, cfg: ModelConfig, file_type: str) -> None:
    """Every checkpoint tensor under its GGUF name, llama Q/K rows in llama.cpp's order, quantized."""
    for hf, info in ckpt.tensors.items():
        name = gguf_name(hf)
        x = ckpt.tensor(hf).float()
        if (heads := permuted_heads(cfg, hf)) is not None:
            x = permute_rows(x, heads)
        qtype = tensor_type(file_type, name, info.shape, cfg.num_hidden_layers)
        data = quantize(x, qtype)
        if qtype in (QT.F32, QT.F16):  # plain numpy floats: the array's own shape (1-D stays 1-D)
            data = data.reshape(info.shape)
        w.add_tensor(name, data, raw_dtype=qtype)


def open_writer(model_dir: str | Path, out: str | Path, file_type: str,
                split_max_tensors: int = 0) -> tuple[GGUFWriter, ModelConfig]:
    """A ``GGUFWriter`` for ``out`` holding a file's metadata (model keys, tokenizer, llama3 ``rope_freqs``)
    from ``config.json`` and the tokenizer files in ``model_dir``; the weight tensors are still to be added.

    Shared by :func:`write_gguf` (quantized floats) and ``engine.gguf.random_writer`` (random blocks).
    """
    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {file_type!r}: use one of {', '.join(FILE_TYPES)}")
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    if cfg.model_type not in _PRE:
        raise ValueError(f"cannot write a {cfg.model_type} model as GGUF: use a llama, qwen2 or qwen3 checkpoint")
    w = GGUFWriter(Path(out), cfg.model_type, split_max_tensors=split_max_tensors)
    _model_kv(w, cfg, file_type)
    _tokenizer_kv(w, model_dir, cfg)
    _sampling_kv(w, model_dir)
    _rope_freqs(w, cfg)
    return w, cfg


def write_gguf(model_dir: str | Path, out: str | Path, file_type: str = "Q8_0", split_max_tensors: int = 0,
               progress: bool = False) -> list[Path]:
    """Write the checkpoint in ``model_dir`` as GGUF at ``out``, quantizing its weights; returns the file(s).

    ``split_max_tensors`` > 0 writes a split set (``out-0000k-of-0000N.gguf``) as llama.cpp's
    ``gguf-split`` does. The whole quantized model is held in memory until it is written (fine for
    tests' tiny models; ``engine.gguf.random_writer`` streams random blocks for benchmark sizes).
    """
    out = Path(out)
    w, cfg = open_writer(model_dir, out, file_type, split_max_tensors)
    ckpt = Checkpoint(Path(model_dir))
    _add_tensors(w, ckpt, cfg, file_type)
    paths = w.format_shard_names(out) if split_max_tensors else [out]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()
    ckpt.close()
    log.info("wrote %s (%s, %d tensors)", paths[0], file_type, len(ckpt.tensors))
    return paths


def describe(paths: list[Path]) -> dict[str, Any]:
    """Tensor-type counts and bytes of a written GGUF (for the synth CLI's summary line)."""
    from engine.gguf.reader import open_gguf_files

    files = open_gguf_files(paths[0])
    counts: dict[str, int] = {}
    for t in files.tensors.values():
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return {"types": counts, "bytes": sum(p.stat().st_size for p in paths), "tensors": len(files.tensors)}
