"""tools/bench_stream.py on the CPU: which files it reads the checkpoint from (safetensors shards or a
GGUF file), and that without CUDA it says so and exits 2."""

from __future__ import annotations

import pytest
import torch

from tools.bench_stream import checkpoint_files, main


def test_checkpoint_files_for_shards_and_gguf(tmp_path):
    shards = tmp_path / "m"
    shards.mkdir()
    for name in ("b.safetensors", "a.safetensors", "notes.txt"):
        (shards / name).touch()
    assert [p.name for p in checkpoint_files(shards)] == ["a.safetensors", "b.safetensors"]
    one = tmp_path / "x.gguf"
    one.touch()
    assert checkpoint_files(one) == [one]
    split = tmp_path / "d"
    split.mkdir()
    (split / "m-00002-of-00002.gguf").touch()
    (split / "m-00001-of-00002.gguf").touch()
    assert [p.name for p in checkpoint_files(split)][0] == "m-00001-of-00002.gguf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors or .gguf"):
        checkpoint_files(tmp_path / "empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_one_error_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CUDA" in err and err.count("\n") == 1
