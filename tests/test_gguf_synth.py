"""``python -m tools.synth --format gguf`` and the header parser against the gguf package's reader."""

from __future__ import annotations

import pytest
from gguf import GGUFReader

from engine.gguf.reader import open_gguf_files
from tools.synth import main as synth_main


@pytest.mark.parametrize("gguf_type,types", [("Q8_0", {"Q8_0", "F32"}), ("Q4_K_M", {"Q5_0", "Q8_0", "F32"})])
def test_synth_gguf_writes_a_runnable_file(tmp_path, capsys, gguf_type, types):
    from engine.run import main

    out = tmp_path / "m"
    assert synth_main(["--preset", "tiny-llama", "--out", str(out), "--format", "gguf", "--gguf-type", gguf_type]) == 0
    path = out / f"model-{gguf_type}.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    found = {t.qtype.name for t in open_gguf_files(path).tensors.values()}
    # tiny-llama rows are 64 or 160 wide: K-quant blocks (256) do not fit; llama-quantize's fallbacks
    # are Q5_0 for Q4_K and Q8_0 for Q6_K (output, some attn_v / ffn_down)
    assert found == types
    assert main(["--model", str(out), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "3", "--json"]) == 0


def test_synth_gguf_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert synth_main(["--preset", "tiny-llama", "--out", str(tmp_path), "--format", "gguf"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").is_file()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3"])
def test_header_parser_equals_gguf_reader(tmp_path, capsys, preset):
    """Our header parser (engine.gguf.header) reads what the gguf package's GGUFReader reads."""
    argv = ["--preset", preset, "--out", str(tmp_path / "m"), "--format", "gguf", "--gguf-type", "Q8_0"]
    assert synth_main(argv) == 0
    path = tmp_path / "m" / "model-Q8_0.gguf"
    ours, ref = open_gguf_files(path), GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want
    assert {t.name: (tuple(int(x) for x in t.shape), t.tensor_type, int(t.data_offset), int(t.n_bytes))
            for t in ref.tensors} == {n: (t.ne, t.qtype, t.offset, t.nbytes) for n, t in ours.tensors.items()}


def test_memreport_plan_only_on_a_gguf(tmp_path, capsys):
    """tools/memreport.py --plan-only reads a GGUF's headers; file bytes are the quantized sizes."""
    import json

    from tools import memreport

    assert synth_main(["--preset", "tiny-qwen2", "--out", str(tmp_path / "m"), "--format", "gguf",
                       "--gguf-type", "Q8_0"]) == 0
    path = tmp_path / "m" / "model-Q8_0.gguf"
    capsys.readouterr()
    assert memreport.main(["--plan-only", "--model", str(path), "--json", "--out-dir", str(tmp_path / "r")]) == 0
    rep = json.loads(capsys.readouterr().out)
    files = open_gguf_files(path)
    used = sum(t.nbytes for n, t in files.tensors.items() if n != "rope_freqs.weight")
    assert rep["model"]["file_bytes"] == used
