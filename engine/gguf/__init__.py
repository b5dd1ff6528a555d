"""GGUF model files (llama.cpp's format): config, tokenizer and weights for the engine.

``open_gguf(path)`` reads a ``.gguf`` file, a directory holding one, or a split set given its
first part, and returns what a Hugging Face directory would give: a ``ModelConfig``, a
checkpoint with the ``engine.checkpoint.Checkpoint`` interface (Hugging Face tensor names and
layout; quantized tensors widened to floats as they are read) and a ``Tokenizer``. Only headers
are parsed here; weights are read when the engine packs them.

Modules: ``paths`` (which files), ``header`` + ``reader`` (headers), ``config`` (metadata ->
ModelConfig), ``vocab`` (tokenizer), ``names`` (tensor names, Q/K row order), ``dequant`` (block
formats -> floats), ``checkpoint`` (the tensors by Hugging Face name); for writing synthetic
files: ``quantize`` (floats -> blocks) and ``writer``, ``random_blocks`` and ``random_writer`` (random
blocks streamed to a file, for benchmark-size synthetic models).

Quantized weights are widened to floats once, as the engine packs them; mapping block formats
onto packed quantized linear weights (issue 15's representation) is a later step: the
checkpoint's ``raw_span`` / ``raw`` table and ``kernels.ggml_blocks.k_scales`` are where it would start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.gguf.checkpoint import GGUFCheckpoint
    from engine.tokenizer import Tokenizer

_DTYPE_NAMES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


def open_gguf(path: str | Path) -> tuple[ModelConfig, GGUFCheckpoint, Tokenizer]:
    """Config, checkpoint (validated against the config) and tokenizer of the GGUF model at ``path``."""
    from engine.checkpoint import check_layer_count
    from engine.gguf.checkpoint import GGUFCheckpoint, widen_dtype
    from engine.gguf.config import architecture, config_from_gguf
    from engine.gguf.reader import open_gguf_files
    from engine.gguf.vocab import tokenizer_from_gguf
    from engine.layout import expected_tensors

    files = open_gguf_files(path)
    cfg = config_from_gguf(files, _DTYPE_NAMES[str(widen_dtype(files))])
    ckpt = GGUFCheckpoint(files, cfg)
    check_layer_count(ckpt.tensors, cfg.num_hidden_layers, f"GGUF file {ckpt.model_dir} does not match its metadata",
                      f"{architecture(files)}.block_count")
    ckpt.validate(expected_tensors(cfg))
    return cfg, ckpt, tokenizer_from_gguf(files.metadata, str(files.path))
