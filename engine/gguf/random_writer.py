"""Synthetic GGUF files whose weights are random blocks, streamed tensor by tensor (benchmark sizes).

:func:`write_random_gguf` writes the file :func:`engine.gguf.writer.write_gguf` would write for a
synthetic checkpoint of the same config (the same metadata, tokenizer, tensor names, order, types,
shapes and offsets; the type mix and metadata come from that module), without any float weights:
each quantized tensor's blocks are random bytes with drawn scales (:mod:`engine.gguf.random_blocks`),
generated on ``device`` (a GPU makes a 72B file disk-bound) and written in chunks, so memory stays
at one chunk whatever the model size. 1-D tensors (norms, biases) are F32 and drawn as
``engine.synth`` draws them. Random rows need no Q/K row permutation (llama): any order is random.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from math import prod
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape
from tqdm import tqdm

from engine.gguf.random_blocks import tensor_chunks
from engine.gguf.writer import gguf_name, open_writer, tensor_type
from engine.synth.writer import INIT_STD, TensorSpec, make_tensor, tensor_seed, tensor_specs

log = logging.getLogger(__name__)


def _generator(seed: int, name: str, device: str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(seed, name))
    return gen


def _tensor_bytes(spec: TensorSpec, qtype: QT, seed: int, device: str, std: float) -> Iterator[np.ndarray]:
    """The stored bytes of one tensor in chunks (host numpy uint8)."""
    if len(spec.shape) == 1:  # norms N(1, 0.02), biases N(0, 0.02): engine.synth's own draw, in F32
        assert qtype == QT.F32, (spec.name, qtype)
        yield make_tensor(TensorSpec(spec.name, spec.shape, "fp32"), seed, device).numpy().view(np.uint8)
        return
    for chunk in tensor_chunks(qtype, spec.shape, std, _generator(seed, spec.name, device)):
        yield chunk.cpu().numpy()


def _stream(w: GGUFWriter, make: dict[str, Iterator[np.ndarray]], progress: bool) -> None:
    """Write the tensor infos, then every tensor's data as ``GGUFWriter.write_tensors_to_file`` lays it
    out (aligned start, each tensor padded), taking chunks from ``make[name]`` for tensors that were
    added without data."""
    assert w.fout is not None
    w.write_ti_data_to_file()
    total = sum(ti.nbytes for shard in w.tensors for ti in shard.values())
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="tensors") as bar:
        for fout, shard in zip(w.fout, w.tensors):
            w.write_padding(fout, fout.tell())
            for name, ti in shard.items():
                written = 0
                for chunk in [ti.tensor] if ti.tensor is not None else make.pop(name):
                    chunk.tofile(fout)
                    written += chunk.nbytes
                    bar.update(chunk.nbytes)
                assert written == ti.nbytes, (name, written, ti.nbytes)
                w.write_padding(fout, written)
                ti.tensor = None
    assert not make, f"tensors never written: {sorted(make)}"


def write_random_gguf(model_dir: str | Path, out: str | Path, file_type: str = "Q4_K_M", seed: int = 0,
                      device: str = "cpu", std: float = INIT_STD, split_max_tensors: int = 0,
                      progress: bool = False) -> list[Path]:
    """Write a GGUF of ``file_type`` for the model whose ``config.json`` and tokenizer files are in
    ``model_dir`` (no weights needed), with random weights; returns the file(s) written.

    Quantized tensors decode to values of root-mean-square ``std`` (the float synthesizer's std by
    default). Random values are drawn on ``device`` from generators seeded by (``seed``, tensor name),
    so a file is reproducible on one device kind.
    """
    out = Path(out)
    w, cfg = open_writer(model_dir, out, file_type, split_max_tensors)
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    make: dict[str, Iterator[np.ndarray]] = {}
    for spec in tensor_specs(config, "fp32"):
        name = gguf_name(spec.name)
        qtype = tensor_type(file_type, name, spec.shape, cfg.num_hidden_layers)
        nbytes = prod(quant_shape_to_byte_shape(spec.shape, qtype))
        w.add_tensor_info(name, spec.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        make[name] = _tensor_bytes(spec, qtype, seed, device, std)
    paths = w.format_shard_names(out) if split_max_tensors else [out]
    count = len(make)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    try:
        _stream(w, make, progress)
    finally:
        w.close()
    log.info("wrote %s (%s, random blocks, %d tensors)", paths[0], file_type, count)
    return paths
