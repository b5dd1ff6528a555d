"""The ``layerstream`` flags: one-line errors without a usage dump, sizes that need a unit, dtype spellings,
--help without torch, and every flag/prompt mistake caught before any weight is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import engine.cli_session as cli_session
from engine.cli_args import DTYPE_ALIASES, join_size_values
from engine.run import build_parser, main
from memory.units import parse_size_arg

ROOT = Path(__file__).resolve().parents[1]


def one_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line starting with 'error:'; return it."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}; stderr:\n{err}"
    assert out == "" and "Traceback" not in err and "usage:" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "see layerstream --help" in lines[0], err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to construct the engine (read weights) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("weights were about to be loaded")
    monkeypatch.setattr(cli_session, "Engine", refuse)


@pytest.mark.parametrize("argv,fragment", [
    (["--vram-budget", "6"], "did you mean 6GB"),
    (["--vram-budget", "6.5"], "did you mean 6.5GB"),
    (["--host-budget", "32"], "did you mean 32GB"),
    (["--vram-budget", "-1GB"], "is negative"),
    (["--vram-budget=-1GB"], "is negative"),
    (["--vram-budget", "6", "GB"], "write the size as one word, --vram-budget 6GB"),
    (["--vram-budget", "6", "GiB", "--prompt", "hi"], "--vram-budget 6GiB"),
    (["--vram-budget", "6XB"], "unknown unit"),
    (["--vram-budget", "0GB"], "--vram-budget must be positive"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--device", "tpu"], "invalid choice"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", "-100", "--repetition-penalty", "1.1"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-0.5"], "--temperature must be"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--min-p", "1"], "--min-p must be in [0, 1)"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--stop", ""], "--stop needs a non-empty string"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--prompt", "", "--no-chat"], "--prompt is empty"),
    (["--json"], "--json needs --prompt"),
    (["--batch", "4"], "--batch applies to --prompt"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--prompts-file", "/no/such/file.txt"], "--prompts-file /no/such/file.txt"),
    (["--seed", str(2**64)], "--seed must fit 64 bits"),
    (["--seed", str(-2**63 - 1)], "--seed must fit 64 bits"),
    (["--prompt", "ok", "--prompt", "caf\udce9"], "prompt 2 is not UTF-8 text: character 3 is an unpaired surrogate "
     "(U+DCE9, from the byte 0xe9 that is not UTF-8)"),  # what Python makes of a Latin-1 terminal's 'café'
    (["--system", "\ud800"], "--system is not UTF-8 text"),
])
def test_flag_mistakes_are_one_line_before_loading(capsys, no_loading, argv, fragment):
    line = one_error(capsys, ["--device", "cpu", *argv] if "--device" not in argv else argv)
    assert fragment in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is present")
def test_triton_kernels_without_cuda_refused_before_loading(capsys, no_loading, tiny_qwen2_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = one_error(capsys, ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--kernels", "triton"])
    assert "--kernels triton needs a CUDA GPU" in line and "--kernels torch" in line


def test_prompt_too_long_refused_before_loading(capsys, no_loading, tiny_qwen2_dir):
    line = one_error(capsys, ["--model", str(tiny_qwen2_dir), "--device", "cpu", "--prompt", "word " * 50,
                              "--max-context", "16"])
    assert "context holds 16" in line


@pytest.mark.parametrize("spelling", sorted(DTYPE_ALIASES) + ["torch.bfloat16", "BF16", "Float16"])
def test_dtype_spellings(spelling):
    args = build_parser().parse_args(["--dtype", spelling])
    assert args.dtype in {"auto", "bf16", "fp16", "fp32"}
    assert args.dtype == DTYPE_ALIASES[spelling.lower().removeprefix("torch.")]


@pytest.mark.parametrize("text,expected", [("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("0", 0), ("512MiB", 2**29),
                                           ("1024B", 1024), ("0.5TB", 5 * 10**11), (" 6 GiB ", 6 * 2**30)])
def test_parse_size_arg_accepts_units(text, expected):
    assert parse_size_arg(text) == expected


@pytest.mark.parametrize("text,fragment", [("6", "did you mean 6GB"), ("1073741824", "write 1073741824B"),
                                           ("-1GB", "negative"), ("abc", "cannot parse")])
def test_parse_size_arg_refuses(text, fragment):
    with pytest.raises(ValueError, match=None) as exc:
        parse_size_arg(text, "--vram-budget")
    assert fragment in str(exc.value)


def test_join_size_values():
    flags = {"--vram-budget"}
    assert join_size_values(["--vram-budget", "-2GB", "--prompt", "-x"], flags) == ["--vram-budget=-2GB",
                                                                                   "--prompt", "-x"]
    assert join_size_values(["--vram-budget", "6GB", "GB"], flags) == ["--vram-budget", "6GB", "GB"]


def test_help_does_not_import_torch_and_explains_every_flag():
    code = ("import sys\nfrom engine.run import main\nrc = main(['--help'])\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("NO_TORCH 0"), res.stdout[-300:]
    text = res.stdout
    assert text.startswith("usage: layerstream ")
    assert "examples:" in text and "hf download" in text and "(default: 4096" in text
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_module_entry_point_runs_a_mistake_without_torch():
    """`python -m engine.run` with a bad flag answers with one line and never imports torch."""
    code = ("import sys\nfrom engine.run import main\nrc = main(['--vram-budget', '6'])\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "NO_TORCH 2" and res.stderr.count("\n") == 1, (res.stdout, res.stderr)
