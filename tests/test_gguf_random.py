"""Synthetic GGUF files of random blocks (engine.gguf.random_blocks / random_writer, the default of
``python -m tools.synth --format gguf``) against the quantize-from-floats path and gguf-py's reader.

Decoded values are checked with both our dequantizer and gguf-py's numpy one (``gguf.quants.dequantize``):
finite, with a root-mean-square within 1.5 % and a standard deviation within 5 % of the asked std
for runs of 8192 blocks (std within 10 % per tensor of a file, whose smallest tensors hold 128 blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, GGUFReader
from gguf.quants import dequantize as np_dequantize

from engine.gguf import dequant, open_gguf
from engine.gguf.random_blocks import K_SCALES, Q6_SCALES, RECIPES, base_scale, random_blocks, tensor_chunks
from engine.gguf.random_writer import write_random_gguf
from engine.gguf.writer import write_gguf
from engine.gguf.names import hf_name
from engine.synth.writer import INIT_STD, TensorSpec, make_tensor, synthesize, tensor_specs, write_safetensors
from kernels.ggml_blocks import k_scales
from tools.synth import main as synth_main


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _decoded(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """gguf-py's values, after checking ours are the same."""
    ref = np_dequantize(raw, qtype).astype(np.float32).reshape(-1)
    ours = dequant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, torch.empty(ref.size))
    assert torch.equal(ours, torch.from_numpy(ref)), qtype
    return ref


@pytest.mark.parametrize("std", [0.001, 0.02, 0.3])
@pytest.mark.parametrize("qtype", list(RECIPES), ids=lambda t: t.name)
def test_random_blocks_decode_to_the_asked_std(qtype: QT, std: float) -> None:
    b = random_blocks(qtype, 8192, std, _gen())
    assert b.dtype == torch.uint8 and b.shape == (8192, dequant.block_geometry(qtype)[1])
    y = _decoded(b.numpy(), qtype)
    assert np.isfinite(y).all()
    rms = np.sqrt(np.mean(y.astype(np.float64) ** 2))  # what the recipes solve for (0.6 % off over 5 seeds)
    assert abs(rms / std - 1) < 0.015 and 0.95 * std < y.std() < 1.05 * std, (rms, y.std(), std)
    assert abs(y.mean()) < 0.02 * std  # centred (a common offset grows through the residual stream)


@pytest.mark.parametrize("qtype", list(RECIPES), ids=lambda t: t.name)
def test_scale_fields_are_valid(qtype: QT) -> None:
    """fp16 d finite and positive (0.75 .. 1.25 of d0), mins / sub-scales in their ranges."""
    b = random_blocks(qtype, 512, INIT_STD, _gen(2))
    d_at = RECIPES[qtype].d_at
    d = b[:, d_at:d_at + 2].contiguous().view(torch.float16).float().view(-1)
    d0 = base_scale(qtype, INIT_STD)
    assert torch.isfinite(d).all() and (d >= 0.749 * d0).all() and (d <= 1.251 * d0).all()
    if qtype in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K):
        m = b[:, 2:4].contiguous().view(torch.float16).float().view(-1)
        sign = -1 if qtype in (QT.Q4_1, QT.Q5_1) else 1
        torch.testing.assert_close(m, sign * RECIPES[qtype].center * d, rtol=1e-3, atol=0)
    if qtype in (QT.Q4_K, QT.Q5_K):
        sc, mn = k_scales(b[:, 4:16])
        assert torch.equal(sc, mn) and sc.min() == K_SCALES[0] and sc.max() == K_SCALES[1]
    if qtype == QT.Q6_K:
        sc = b[:, 192:208].contiguous().view(torch.int8).abs()
        assert sc.min() == Q6_SCALES[0] and sc.max() == Q6_SCALES[1]


def test_std_outside_what_fp16_scales_hold() -> None:
    with pytest.raises(ValueError, match="fp16"):
        base_scale(QT.Q6_K, 1e-5)


@pytest.mark.parametrize("qtype,shape", [(QT.Q4_K, (40, 512)), (QT.Q8_0, (7, 96)), (QT.F16, (3, 40)),
                                         (QT.BF16, (5, 64)), (QT.F32, (2, 3))], ids=str)
def test_tensor_chunks_are_whole_and_reproducible(monkeypatch: pytest.MonkeyPatch, qtype: QT,
                                                  shape: tuple[int, int]) -> None:
    from engine.gguf import random_blocks as rb

    monkeypatch.setattr(rb, "CHUNK_BYTES", 300)  # several chunks, a last partial one
    block, size = dequant.block_geometry(qtype)
    chunks = list(tensor_chunks(qtype, shape, 0.5, _gen(3)))
    assert len(chunks) > 1 or shape[0] * shape[1] // block * size <= 300
    raw = torch.cat(chunks)
    assert raw.numel() == shape[0] * shape[1] // block * size
    assert torch.equal(raw, torch.cat(list(tensor_chunks(qtype, shape, 0.5, _gen(3)))))
    y = _decoded(raw.numpy(), qtype)
    assert np.isfinite(y).all() and y.std() > 0.2


@pytest.fixture(scope="module")
def k_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-qwen2's tokenizer with 256-wide rows and 8 layers (so Q4_K_M holds Q4_K and Q6_K, and
    llama.cpp's use_more_bits layers differ), bf16 float weights for the quantize-from-floats path."""
    d = synthesize("tiny-qwen2", tmp_path_factory.mktemp("k") / "m", weights=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, max_window_layers=8)
    (d / "config.json").write_text(json.dumps(cfg))
    write_safetensors(d / "model.safetensors", tensor_specs(cfg), lambda s: make_tensor(s, 0))
    return d


def _layout(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes))
               for t in r.tensors}
    return meta, tensors


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1"])
def test_k_model_same_layout_as_quantized_path(tmp_path: Path, k_model_dir: Path, file_type: str) -> None:
    fast = write_random_gguf(k_model_dir, tmp_path / "fast.gguf", file_type)[0]
    slow = write_gguf(k_model_dir, tmp_path / "slow.gguf", file_type)[0]
    assert _layout(fast) == _layout(slow)
    assert fast.stat().st_size == slow.stat().st_size
    types = {t.tensor_type for t in GGUFReader(fast).tensors}
    if file_type in ("Q4_K_M", "Q5_K_M"):
        assert types == {QT.F32, QT.Q6_K, QT.Q4_K if file_type == "Q4_K_M" else QT.Q5_K}


def test_k_model_values_and_greedy_run(tmp_path: Path, k_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every tensor read through gguf-py decodes to finite values of the expected std; the engine's
    loader opens the file and generates greedy tokens from it on the CPU."""
    from engine.run import main as run_main

    out = tmp_path / "m"
    out.mkdir()
    path = write_random_gguf(k_model_dir, out / "model.gguf", "Q4_K_M", seed=5)[0]
    for t in GGUFReader(path).tensors:
        y = _decoded(np.asarray(t.data).reshape(-1).view(np.uint8), t.tensor_type)
        assert np.isfinite(y).all(), t.name
        if len(t.shape) == 1:  # norms and biases: F32, engine.synth's own draw
            spec = TensorSpec(hf_name(t.name), (int(t.shape[0]),), "fp32")
            assert t.tensor_type == QT.F32 and np.array_equal(y, make_tensor(spec, 5).numpy()), t.name
        else:
            assert 0.9 * INIT_STD < y.std() < 1.1 * INIT_STD and abs(y.mean()) < 0.1 * INIT_STD, t.name
    cfg, ckpt, _ = open_gguf(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (256, 8)
    assert run_main(["--model", str(out), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "4",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["generated_tokens"] == 4 and all(0 <= i < cfg.vocab_size for i in result["token_ids"])


def test_split_set(tmp_path: Path, k_model_dir: Path) -> None:
    parts = write_random_gguf(k_model_dir, tmp_path / "s.gguf", "Q8_0", split_max_tensors=20)
    whole = write_random_gguf(k_model_dir, tmp_path / "w.gguf", "Q8_0")[0]
    assert len(parts) > 2 and all(p.is_file() for p in parts)
    split = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for p in parts for t in GGUFReader(p).tensors}
    assert split == {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in GGUFReader(whole).tensors}


@pytest.mark.parametrize("preset,file_type", [("tiny-llama", "Q4_K_M"), ("tiny-qwen2", "Q8_0"),
                                              ("tiny-qwen3", "Q5_K_M"), ("tiny-qwen2", "BF16")])
def test_cli_default_equals_from_floats_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str,
                                               file_type: str) -> None:
    """``--format gguf`` (random blocks) and ``--gguf-from-floats`` write the same metadata, names,
    types, shapes and offsets for the tiny presets (llama: rope_freqs, Q/K rows; qwen3: q/k norms)."""
    base = ["--preset", preset, "--format", "gguf", "--gguf-type", file_type]
    assert synth_main([*base, "--out", str(tmp_path / "fast")]) == 0
    assert synth_main([*base, "--out", str(tmp_path / "slow"), "--gguf-from-floats"]) == 0
    name = f"model-{file_type}.gguf"
    assert _layout(tmp_path / "fast" / name) == _layout(tmp_path / "slow" / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast", "slow"]  # no staging directory left



def test_cli_from_floats_needs_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synth_main(["--preset", "tiny-qwen2", "--out", str(tmp_path / "m"), "--gguf-from-floats"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gguf-from-floats applies to --format gguf only"
    assert not (tmp_path / "m").exists()


@pytest.mark.cuda
def test_generated_on_cuda(tmp_path: Path, k_model_dir: Path) -> None:
    """--device cuda: the same layout as a CPU-generated file, its blocks valid and of the asked std."""
    gpu = write_random_gguf(k_model_dir, tmp_path / "gpu.gguf", "Q4_K_M", device="cuda")[0]
    cpu = write_random_gguf(k_model_dir, tmp_path / "cpu.gguf", "Q4_K_M")[0]
    assert _layout(gpu) == _layout(cpu)
    for t in GGUFReader(gpu).tensors:
        y = _decoded(np.asarray(t.data).reshape(-1).view(np.uint8), t.tensor_type)
        assert np.isfinite(y).all(), t.name
        if len(t.shape) == 2:
            assert 0.9 * INIT_STD < y.std() < 1.1 * INIT_STD, t.name
    b = random_blocks(QT.Q4_K, 64, INIT_STD, torch.Generator(device="cuda").manual_seed(0))
    assert b.is_cuda and (k_scales(b[:, 4:16].cpu())[0] >= K_SCALES[0]).all()
