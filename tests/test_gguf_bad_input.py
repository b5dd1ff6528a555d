"""Unusable GGUF input through the CLI: one ``error:`` line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFWriter

from engine.run import main


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_qwen2_dir) -> Path:
    from engine.gguf.writer import write_gguf

    return write_gguf(tiny_qwen2_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "Q8_0")[0]


def run_cli(capsys, model: Path) -> str:
    rc = main(["--model", str(model), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_tiny_gguf_runs(capsys, tiny_gguf):
    """The file the other cases break is a good one."""
    assert main(["--model", str(tiny_gguf), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()


def test_not_a_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    assert "is not a GGUF file" in run_cli(capsys, bad)


@pytest.mark.parametrize("keep", [0.5, 0.02, 10], ids=["half", "in-metadata", "10-bytes"])
def test_truncated(capsys, tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    msg = run_cli(capsys, cut)
    assert "truncated" in msg and "re-download" in msg, msg


def test_unsupported_tensor_type(capsys, tmp_path, tiny_qwen2_dir, monkeypatch):
    """An IQ4_NL tensor (a type the engine does not read) is named, with the supported ones."""
    from engine.gguf import writer

    def fake_type(file_type, gguf, shape, n_layers):
        return QT.IQ4_NL if gguf == "blk.1.ffn_up.weight" else QT.F32 if len(shape) == 1 else QT.Q8_0

    def fake_quantize(x, qtype):
        if qtype != QT.IQ4_NL:
            return writer_quantize(x, qtype)
        rows, cols = x.reshape(-1, x.shape[-1]).shape
        return np.zeros((rows, cols // 32 * 18), dtype=np.uint8)  # IQ4_NL: 32 values in 18 bytes

    writer_quantize = writer.quantize
    monkeypatch.setattr(writer, "tensor_type", fake_type)
    monkeypatch.setattr(writer, "quantize", fake_quantize)
    path = writer.write_gguf(tiny_qwen2_dir, tmp_path / "iq4.gguf", "Q8_0")[0]
    msg = run_cli(capsys, path)
    assert "blk.1.ffn_up.weight" in msg and "IQ4_NL" in msg and "Q4_K" in msg, msg


def _one_tensor_gguf(path: Path, arch: str, alignment: object = None) -> Path:
    """A GGUF file of architecture ``arch`` with a block count and one embedding tensor, nothing else
    (and ``general.alignment`` set to a string, when given one)."""
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    if isinstance(alignment, str):
        w.add_string("general.alignment", alignment)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(capsys, tmp_path):
    path = _one_tensor_gguf(tmp_path / "phi.gguf", "phi2")
    msg = run_cli(capsys, path)
    assert "'phi2'" in msg and "llama, qwen2, qwen3" in msg, msg


def test_split_part_missing(capsys, tmp_path, tiny_qwen2_dir):
    from engine.gguf.writer import write_gguf

    parts = write_gguf(tiny_qwen2_dir, tmp_path / "m.gguf", "Q8_0", split_max_tensors=8)
    assert len(parts) >= 3
    parts[1].unlink()
    msg = run_cli(capsys, parts[0])
    assert parts[1].name in msg and "missing" in msg, msg
    msg = run_cli(capsys, parts[2])  # not the first part
    assert "pass the first part" in msg and parts[0].name in msg, msg


def test_directory_with_two_models(capsys, tmp_path, tiny_gguf):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf, tmp_path / name)
    msg = run_cli(capsys, tmp_path)
    assert "several GGUF models" in msg and "a.gguf" in msg, msg


def test_missing_gguf_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = run_cli(capsys, Path("nothing-here.gguf"))
    assert "does not exist" in msg and "nothing-here.gguf" in msg, msg


def test_metadata_missing_keys(capsys, tmp_path):
    path = _one_tensor_gguf(tmp_path / "bare.gguf", "llama")
    msg = run_cli(capsys, path)
    assert "llama.embedding_length" in msg and "re-download" in msg, msg


def test_an_alignment_that_is_not_a_number_is_refused(capsys, tmp_path):
    msg = run_cli(capsys, _one_tensor_gguf(tmp_path / "align.gguf", "llama", alignment="32"))
    assert "general.alignment '32' is not a power of two" in msg and "re-download" in msg, msg


def _tensor_info_at(data: bytes, name: str) -> int:
    """Byte offset, in a GGUF's header, of tensor ``name``'s info right after its name: n_dims (u32),
    the dims (u64 each), the ggml type (u32), the data offset (u64)."""
    key = len(name).to_bytes(8, "little") + name.encode()
    assert data.count(key) == 1, name
    return data.index(key) + len(key)


@pytest.mark.parametrize("field,value", [("offset", 64), ("offset", 32), ("type", int(QT.Q4_0))],
                         ids=["offset-moved", "offset-onto-the-previous-tensor", "type-changed"])
def test_a_tensor_table_that_breaks_ggmls_layout_is_refused(capsys, tmp_path, tiny_gguf, field, value):
    """A corrupt data offset or type makes a tensor read another's bytes (before: NaN logits once the
    model ran); ggml's rule (each tensor's data starts where the one before ends, padded) catches it."""
    data = bytearray(tiny_gguf.read_bytes())
    at = _tensor_info_at(bytes(data), "blk.0.attn_q.weight")
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    if field == "type":
        data[type_at:type_at + 4] = value.to_bytes(4, "little")  # Q8_0 -> Q4_0: fewer bytes, same blocks
    else:
        off = int.from_bytes(data[type_at + 4:type_at + 12], "little")
        data[type_at + 4:type_at + 12] = (off + value if value == 64 else off - value).to_bytes(8, "little")
    bad = tmp_path / "moved.gguf"
    bad.write_bytes(bytes(data))
    msg = run_cli(capsys, bad)
    name = "blk.0.attn_q.bias" if field == "type" else "blk.0.attn_q.weight"
    assert f"is corrupt: tensor '{name}' starts at byte" in msg and "re-download" in msg, msg


def test_a_merge_of_tokens_not_in_the_vocabulary_is_a_corrupt_tokenizer(capsys, tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    merge = (4).to_bytes(8, "little") + "Ġ t".encode()  # the first merge; Ġ is two bytes
    assert data.count(merge) == 1
    bad = tmp_path / "merges.gguf"  # 0x7f is no token of a byte-level vocabulary (its alphabet spells it otherwise)
    bad.write_bytes(data.replace(merge, (4).to_bytes(8, "little") + "Ġ \x7f".encode()))
    msg = run_cli(capsys, bad)
    assert "is corrupt: its tokenizer cannot be built" in msg and "out of vocabulary" in msg, msg


@pytest.mark.parametrize("key,value,expected", [
    ("tokenizer.ggml.merges", ["a b", 7], "tokenizer.ggml.merges should be an array of strings"),
    ("tokenizer.ggml.tokens", ["a", None], "tokenizer.ggml.tokens should be an array of strings"),
    ("tokenizer.ggml.token_type", [1, "x"], "tokenizer.ggml.token_type should be an array of integers"),
    ("tokenizer.ggml.scores", "0.5", "tokenizer.ggml.scores should be an array of numbers"),
    ("tokenizer.chat_template", ["{{ x }}"], "tokenizer.chat_template should be a string"),
])
def test_tokenizer_metadata_of_the_wrong_type_is_refused(tiny_gguf, key, value, expected):
    """What a flipped value type in the header gives (a TypeError from deep in tokenizers before)."""
    from engine.gguf.reader import read_part
    from engine.gguf.vocab import tokenizer_from_gguf

    meta = read_part(tiny_gguf)[0]
    assert tokenizer_from_gguf(meta, "tiny.gguf").encode("hello")
    with pytest.raises(ValueError, match=f"tiny.gguf is corrupt: {expected}; re-download it"):
        tokenizer_from_gguf({**meta, key: value}, "tiny.gguf")


def test_a_block_count_that_does_not_match_the_tensors_is_refused_before_any_per_layer_work(capsys, tmp_path,
                                                                                           tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    key = b"qwen2.block_count"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4  # UINT32
    data[at + 4:at + 8] = (2**31).to_bytes(4, "little")
    bad = tmp_path / "blocks.gguf"
    bad.write_bytes(bytes(data))
    msg = run_cli(capsys, bad)
    assert f"does not match its metadata: qwen2.block_count is {2**31}, but the weights hold layers 0-2 (3 of them)" \
        in msg, msg
