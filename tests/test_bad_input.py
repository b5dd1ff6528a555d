"""Bad input: one clear message, a non-zero exit, no traceback, and nothing written to the model dir.

Every case goes through the command line (``engine.run.main``); those about the model directory
also through the ``Engine`` API, which must raise ValueError / FileNotFoundError with the same text.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from engine.engine import Engine, EngineOptions
from engine.run import main
from tests.helpers import dir_snapshot

BASE_ARGS = ["--prompt", "hi", "--no-chat", "--max-new-tokens", "2", "--device", "cpu", "--max-context", "64"]


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, out: str, err: str, fragments: list[str]) -> None:
    assert isinstance(rc, int) and rc != 0, f"exit code {rc!r}; stderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line, stderr:\n{err}"
    for f in fragments:
        assert f.lower() in err.lower(), f"{f!r} not in stderr:\n{err}"
    assert out.strip() == "", f"nothing should be generated, stdout: {out!r}"


@pytest.fixture
def model_copy(tmp_path, tiny_qwen2_dir) -> Path:
    """A private copy of the tiny-qwen2 checkpoint to break."""
    d = tmp_path / "model"
    shutil.copytree(tiny_qwen2_dir, d)
    return d


# ----------------------------------------------------------------------------- model directory cases

def _missing_dir(d: Path) -> tuple[Path, list[str]]:
    shutil.rmtree(d)
    return d, ["does not exist"]


def _no_config(d: Path):
    (d / "config.json").unlink()
    return d, ["no config.json"], ["config.json not found"]


def _config_not_json(d: Path):
    (d / "config.json").write_text('{"model_type": "qwen2", ')
    return d, ["config.json is not valid json"]


def _truncated_shard(d: Path):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return d, ["model.safetensors is truncated", "re-download"]


def _garbage_header(d: Path):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:64] = bytes(range(200, 256)) + b"\xff" * 8  # a huge header length
    f.write_bytes(bytes(data))
    return d, ["corrupt safetensors header"]


def _garbage_header_json(d: Path):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8:8 + n] = b"\x00\x9c" * (n // 2) + b"!" * (n % 2)  # same length, not JSON
    f.write_bytes(bytes(data))
    return d, ["corrupt safetensors header"]


def _edit_header(d: Path, name: str, **changes) -> None:
    """Rewrite model.safetensors with tensor ``name``'s header entry changed (the data as it was)."""
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[name] = {**header[name], **changes}
    body = json.dumps(header).encode()
    f.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n:])


def _overlapping_tensors(d: Path):
    """down_proj's range moved onto the tensor before it (the same length): its bytes would be another's."""
    name = "model.layers.1.mlp.down_proj.weight"
    f = d / "model.safetensors"
    header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
    start, end = header[name]["data_offsets"]
    _edit_header(d, name, data_offsets=[start - 64, end - 64])
    return d, ["overlap in the file", name, "re-download"]


def _float8_tensor(d: Path):
    _edit_header(d, "model.norm.weight", dtype="F8_E4M3")  # before: "bad header entry ... ('F8_E4M3')"
    return d, ["tensor 'model.norm.weight' has dtype 'F8_E4M3', which this engine does not read"]


def _gpt2_config(d: Path):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 3,
           "n_positions": 1024, "vocab_size": 1088, "activation_function": "gelu_new", "bos_token_id": 0,
           "eos_token_id": 0}
    (d / "config.json").write_text(json.dumps(cfg))
    return d, ["gpt2", "unsupported"]


def _wrong_shape(d: Path):
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.self_attn.q_proj.weight"
    tensors = load_file(d / "model.safetensors")
    rows, cols = tensors[name].shape
    tensors[name] = tensors[name].reshape(rows * 2, cols // 2).contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d, [name, f"has shape [{rows * 2}, {cols // 2}]", f"implies [{rows}, {cols}]"]


def _missing_tensor(d: Path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d, ["missing tensors", "model.layers.2.mlp.down_proj.weight"]


def _pickles_only(d: Path):
    from safetensors.torch import load_file

    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(tensors, d / "pytorch_model.bin")
    return d, ["pytorch_model.bin", "pickled weights are never loaded"]


def _edit_json(d: Path, name: str, **changes) -> None:
    data = json.loads((d / name).read_text())
    (d / name).write_text(json.dumps({**data, **changes}))


def _config_wrong_types(d: Path):
    _edit_json(d, "config.json", hidden_size="256", rope_scaling=4)
    return d, ["config.json: hidden_size should be an integer, got '256'", "fix the file"]


def _config_nested_type(d: Path):
    _edit_json(d, "config.json", model_type={"name": "qwen2"})  # before: "unhashable type: 'dict'"
    return d, ["config.json: model_type should be a string"]


def _config_zero_heads(d: Path):
    _edit_json(d, "config.json", num_attention_heads=0)  # before: ZeroDivisionError's "modulo by zero"
    return d, ["num_attention_heads must be positive, got 0"]


def _config_huge_layer_count(d: Path):
    _edit_json(d, "config.json", num_hidden_layers=2**40)  # before: a loop over 2**40 layers (a hang)
    return d, [f"num_hidden_layers is {2**40}, but the weights hold layers 0-2 (3 of them)"]


def _quantization_config_not_an_object(d: Path):
    _edit_json(d, "config.json", quantization_config="awq")  # before: AttributeError's traceback
    return d, ["quantization_config should be an object", "'awq'"]


MODEL_DIR_CASES = {
    "config-wrong-types": _config_wrong_types, "config-nested-type": _config_nested_type,
    "config-zero-heads": _config_zero_heads, "config-huge-layer-count": _config_huge_layer_count,
    "quantization-config-not-an-object": _quantization_config_not_an_object,
    "overlapping-tensors": _overlapping_tensors, "float8-tensor": _float8_tensor,
    "missing-dir": _missing_dir, "no-config": _no_config, "config-not-json": _config_not_json,
    "truncated-shard": _truncated_shard, "garbage-header-length": _garbage_header,
    "garbage-header-json": _garbage_header_json, "unsupported-architecture": _gpt2_config,
    "wrong-shape": _wrong_shape, "missing-tensor": _missing_tensor, "pickles-only": _pickles_only,
}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle (torch.load / pickle.load[s]) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the engine tried to unpickle a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("case", list(MODEL_DIR_CASES))
def test_bad_model_dir(capsys, model_copy, no_unpickling, case):
    d, fragments, *api = MODEL_DIR_CASES[case](model_copy)
    before = dir_snapshot(d)
    rc, out, err = run_cli(capsys, ["--model", str(d), *BASE_ARGS])
    assert_clean_error(rc, out, err, fragments)
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        Engine(d, EngineOptions(device="cpu", max_context=64))
    if case != "missing-dir":  # the CLI's resolver words this one; Engine reports the missing config.json
        for f in (api[0] if api else fragments):
            assert f.lower() in str(exc.value).lower(), f"{f!r} not in {exc.value}"
    assert dir_snapshot(d) == before, "the model directory was modified"
    assert d.exists() == (case != "missing-dir")


@pytest.mark.parametrize("template,fragment", [
    ("{{ 1 / 0 }}", "chat template failed: ZeroDivisionError: division by zero"),
    ("{{ messages[7].content }}", "chat template failed: list object has no element 7"),
    ("{% for i in range(10**9) %}x{% endfor %}", "chat template failed: OverflowError"),
])
def test_a_chat_template_that_fails_is_one_error(capsys, model_copy, template, fragment):
    """The template's own bug (before: a traceback from inside jinja for anything but a TemplateError)."""
    _edit_json(model_copy, "tokenizer_config.json", chat_template=template)
    rc, out, err = run_cli(capsys, ["--model", str(model_copy), *[a for a in BASE_ARGS if a != "--no-chat"]])
    assert_clean_error(rc, out, err, [fragment])


def test_missing_shard_named_by_index(capsys, tmp_path, no_unpickling):
    from engine.synth.writer import synthesize

    d = synthesize("tiny-qwen2", tmp_path / "sharded", max_shard_bytes=150_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    (d / shards[1]).unlink()
    before = dir_snapshot(d)
    rc, out, err = run_cli(capsys, ["--model", str(d), *BASE_ARGS])
    assert_clean_error(rc, out, err, [shards[1], "missing", "re-download"])
    assert dir_snapshot(d) == before


def test_sharded_checkpoint_loads(capsys, tmp_path):
    """Control for the case above: the intact sharded checkpoint runs."""
    from engine.synth.writer import synthesize

    d = synthesize("tiny-qwen2", tmp_path / "sharded", max_shard_bytes=150_000)
    rc, out, err = run_cli(capsys, ["--model", str(d), *BASE_ARGS, "--max-context", "256", "--json"])
    assert rc == 0, err
    assert len(json.loads(out)["token_ids"]) <= 2


# ----------------------------------------------------------------------------- flag cases

def test_unparsable_vram_budget(capsys, tiny_qwen2_dir):
    before = dir_snapshot(tiny_qwen2_dir)
    rc, out, err = run_cli(capsys, ["--model", str(tiny_qwen2_dir), *BASE_ARGS, "--vram-budget", "abc"])
    assert_clean_error(rc, out, err, ["cannot parse size 'abc'", "512MiB"])
    assert dir_snapshot(tiny_qwen2_dir) == before


def test_vram_budget_below_minimum(capsys, tiny_qwen2_dir):
    rc, out, err = run_cli(capsys, ["--model", str(tiny_qwen2_dir), *BASE_ARGS, "--vram-budget", "1MB"])
    assert_clean_error(rc, out, err, ["below the minimum", "raise --vram-budget"])


def test_prompt_longer_than_context(capsys, tiny_qwen2_dir):
    before = dir_snapshot(tiny_qwen2_dir)
    argv = ["--model", str(tiny_qwen2_dir), "--prompt", "a long prompt " * 20, "--no-chat", "--device", "cpu",
            "--max-context", "8", "--max-new-tokens", "2"]
    rc, out, err = run_cli(capsys, argv)
    assert_clean_error(rc, out, err, ["context holds 8", "--max-context"])
    assert dir_snapshot(tiny_qwen2_dir) == before


def test_unknown_alias(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, out, err = run_cli(capsys, ["--model", "qwen9-999b", *BASE_ARGS])
    assert_clean_error(rc, out, err, ["unknown model 'qwen9-999b'", "known aliases"])
    assert not (tmp_path / "hub").exists(), "the resolver created the hub cache"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_device_cuda_without_cuda(capsys, tiny_qwen2_dir):
    before = dir_snapshot(tiny_qwen2_dir)
    argv = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--device", "cuda", "--max-new-tokens", "2"]
    rc, out, err = run_cli(capsys, argv)
    assert_clean_error(rc, out, err, ["--device cuda", "no cuda gpu", "--device cpu"])
    assert dir_snapshot(tiny_qwen2_dir) == before


@pytest.mark.parametrize("flag,value,fragment", [("--batch", "0", "--batch must be >= 1"),
                                                  ("--max-context", "1", "--max-context must be >= 2")])
def test_bad_numbers(capsys, tiny_qwen2_dir, flag, value, fragment):
    argv = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2",
            flag, value]
    rc, out, err = run_cli(capsys, argv)
    assert_clean_error(rc, out, err, [fragment])
