"""Our torch GGUF dequantizers against the gguf package's numpy reference (``gguf.quants.dequantize``).

Blocks are random bytes (every bit pattern the format allows, scales kept finite), plus blocks
quantized from real-valued data where the package can quantize; shapes cover one block, several
rows and a row count that is not a multiple of the widening chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as np_dequantize, quantize as np_quantize

from engine.gguf import dequant
from engine.gguf.dequant import DECODERS, block_geometry

QUANTIZED = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# byte offsets of the fp16 scales in each block (kept finite: random bytes may spell inf / nan)
F16_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q4_K: [0, 2],
              QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def random_blocks(qtype: QT, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """[rows, blocks_per_row * type_size] random bytes with finite, moderate fp16 scales."""
    _, size = block_geometry(qtype)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * blocks_per_row, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(-0.05, 0.05, rows * blocks_per_row).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def ours(raw: np.ndarray, qtype: QT, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    block, size = block_geometry(qtype)
    out = torch.empty(raw.shape[0], raw.shape[1] // size * block, dtype=dtype)
    return dequant.dequantize(torch.from_numpy(raw.copy()), qtype, out)


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (5, 2)], ids=["1block", "3x4", "5x2"])
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype, shape):
    raw = random_blocks(qtype, *shape, seed=int(qtype) * 10 + shape[0])
    want = torch.from_numpy(np_dequantize(raw, qtype).astype(np.float32))
    got = ours(raw, qtype)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
def test_quantized_real_data_round_trips(qtype):
    """Blocks the package quantizes from Gaussian weights widen to the package's values, close to the data."""
    x = np.random.default_rng(3).normal(0, 0.02, (6, 256)).astype(np.float32)
    raw = np_quantize(x, qtype)
    got = ours(raw, qtype)
    torch.testing.assert_close(got, torch.from_numpy(np_dequantize(raw, qtype)), rtol=1e-6, atol=1e-7)
    step = 0.02 * 8 / (2 ** (8 if qtype == QT.Q8_0 else 4))  # a few sigma over the quantization levels
    assert (got - torch.from_numpy(x)).abs().max() < step


def test_chunking_covers_every_block(monkeypatch):
    """More blocks than one widening chunk (the chunk is shrunk to 3 blocks to see it)."""
    monkeypatch.setattr(dequant, "CHUNK_VALUES", 3 * 256)
    raw = random_blocks(QT.Q6_K, 4, 2, seed=9)  # 8 blocks: chunks of 3, 3, 2
    torch.testing.assert_close(ours(raw, QT.Q6_K), torch.from_numpy(np_dequantize(raw, QT.Q6_K)),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype,np_dtype", [(QT.F32, np.float32), (QT.F16, np.float16)], ids=["F32", "F16"])
def test_plain_floats(qtype, np_dtype):
    x = np.random.default_rng(1).normal(0, 1, (3, 8)).astype(np_dtype)
    got = ours(x.view(np.uint8), qtype)
    assert torch.equal(got, torch.from_numpy(x.astype(np.float32)))


def test_bf16():
    x = torch.randn(4, 16).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().view(np.uint8)
    want = np_dequantize(raw, QT.BF16)
    got = ours(raw, QT.BF16)
    assert torch.equal(got, torch.from_numpy(want)) and torch.equal(got, x.float())


def test_widen_into_half_precision():
    raw = random_blocks(QT.Q4_K, 2, 1, seed=4)
    got = ours(raw, QT.Q4_K, torch.float16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), torch.from_numpy(np_dequantize(raw, QT.Q4_K)), rtol=1e-3, atol=1e-5)


def test_unsupported_type_is_named():
    assert QT.IQ2_XXS not in DECODERS
    with pytest.raises(ValueError, match=r"IQ2_XXS.*supported: F32, F16, BF16, Q8_0"):
        dequant.check_supported(QT.IQ2_XXS, "blk.0.attn_q.weight", "m.gguf")
