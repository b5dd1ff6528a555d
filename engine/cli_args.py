"""The flags of ``layerstream`` (``python -m engine.run``) and every check that needs no weights.

This module imports nothing heavy (no torch): ``layerstream --help`` and a mistyped flag answer
at once, and every mistake that can be caught from the flags alone is caught before a model is
opened. A parse error is one line, ``error: ... (see layerstream --help)``, exit 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence

from engine.text import utf8_problem
from memory.host_lane import parse_host_compute
from memory.units import parse_size_arg

PROG = "layerstream"
SIZE_HELP = "sizes need a unit: 6GB (10^9 bytes), 6GiB (2^30 bytes), 512MiB, 0.5TB, 1024B"
DTYPE_ALIASES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                 "half": "fp16", "f16": "fp16", "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32"}
_UNIT_WORD = re.compile(r"^(b|[kmgt]i?b?)$", re.IGNORECASE)
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)$")


class UsageError(ValueError):
    """A flag or the prompt is wrong; the CLI prints it as one line with a pointer to --help."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description and epilog as written; appends a flag's default when it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if "%(default)" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and size flags read the way people type them."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.size_flags: set[str] = set()

    def add_size_argument(self, flag: str, **kwargs) -> argparse.Action:
        """A flag taking a byte size with a unit; parsed to int bytes."""
        self.size_flags.add(flag)
        return self.add_argument(flag, type=_size_type(flag), metavar="SIZE", **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        message = message.removeprefix("argument ")
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        try:
            argv = join_size_values(argv, self.size_flags)
        except UsageError as e:
            self.error(str(e))
        return super().parse_known_args(argv, namespace)


def join_size_values(argv: list[str], size_flags: set[str]) -> list[str]:
    """``--vram-budget -1GB`` -> ``--vram-budget=-1GB`` (so the parser reports a negative size instead
    of a missing value); ``--vram-budget 6 GB`` -> UsageError naming the one-word form."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in size_flags and nxt is not None:
            after = argv[i + 2] if i + 2 < len(argv) else None
            if _NUMBER.match(nxt) and after is not None and _UNIT_WORD.match(after):
                raise UsageError(f"{tok} {nxt} {after}: write the size as one word, {tok} {nxt}{after}")
            if nxt.startswith("-") and len(nxt) > 1 and (nxt[1].isdigit() or nxt[1] == "."):
                out.append(f"{tok}={nxt}")
                i += 2
                continue
        out.append(tok)
        i += 1
    return out


def _size_type(flag: str):
    def parse(text: str) -> int:
        try:
            return parse_size_arg(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "size"
    return parse


def dtype_arg(text: str) -> str:
    """torch / Hugging Face / vLLM spellings of a dtype -> auto | bf16 | fp16 | fp32."""
    key = text.strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}: use auto, bf16 (bfloat16), fp16 (float16, half) or fp32 (float32, float)")
    return DTYPE_ALIASES[key]


def host_compute_arg(text: str) -> str | int:
    """``--host-compute``: auto | off | a number of layers (memory.host_lane)."""
    try:
        return parse_host_compute(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--host-compute ")) from None


def add_engine_args(p: CliParser, host_lane: bool = True) -> None:
    """Flags that shape the engine: device, dtype, kernels, threads, budgets, context, batch; ``host_lane``:
    whether this command computes host layers (``--host-compute`` then defaults to auto, else to off)."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where to compute; auto = cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", default="auto", type=dtype_arg, metavar="{auto,bf16,fp16,fp32}",
                   help="compute dtype (float16/bfloat16/float32/half also accepted); auto = the checkpoint's on "
                        "CUDA; on the CPU fp32 when it fits in RAM, else the checkpoint's")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="triton kernels (auto on CUDA) or the plain-torch reference path (auto on the CPU)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch's compute and for loading weights (default: torch's choice for the "
                        "compute; the CPUs this process may use, at most 8, for loading)")
    p.add_size_argument("--vram-budget", help="GPU memory the engine may use (weights, staging slots, KV cache, "
                        f"activations); on the CPU: RAM for the resident part; {SIZE_HELP}")
    p.add_size_argument("--host-budget", help="pinned host memory for streamed layers (default: available RAM "
                        "minus a margin, and minus --vram-budget on the CPU); streamed layers beyond it are read "
                        "from disk")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="KV-cache length per sequence (default: 4096, or the model's trained context if shorter)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="sequences decoded together (default: the number of prompts; one prompt with a larger "
                        "--batch is repeated)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens per prefill pass (smaller needs less activation memory; default 2048, "
                        "lowered to fit --vram-budget)")
    p.add_argument("--prefill-states", default="auto", choices=["auto", "vram", "host"],
                   help="where a long prompt's hidden states wait between layers in the layer-major prefill: vram, "
                        "or pinned host memory (copied in and out per chunk beside the compute); auto = host when "
                        "in VRAM they would cost resident layers or prefill chunk size (--show-plan says why)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="round the layers' linear weights to nearest at load (a bf16/fp16 checkpoint); "
                        "quantized checkpoints (AWQ, GPTQ, compressed-tensors) are detected without it")
    p.add_argument("--quant-group", type=int, default=128, metavar="N",
                   help="--quantize group size along the input dim (-1: one scale per output row)")
    p.add_argument("--host-compute", default="auto" if host_lane else "off", type=host_compute_arg,
                   metavar="{auto,off,N}",
                   help="decode steps compute some streamed layers on the CPU from their pinned host copy while "
                        "others stream (GPU runs): auto (default) = the split the measured host and H2D rates "
                        "predict fastest, none where no layer streams or none would help, retired mid-run if its "
                        "steps prove slower than streaming; off = stream every non-resident layer and leave the "
                        "CPU's cores idle; N = N host layers" if host_lane else
                        "not used by the server (its batches stream every non-resident layer): off")
    p.add_argument("--quant-cache", action="store_true",
                   help="keep the repacked (AWQ / GPTQ) or --quantize'd layers in a cache file (the size of the "
                        "packed layers) so later runs and disk-tier streaming read them without converting again")


def check_engine_args(args: argparse.Namespace) -> None:
    """UsageError for engine flags out of range (no torch needed)."""
    for flag, low in (("batch", 1), ("prefill_chunk", 1), ("max_context", 2), ("threads", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if getattr(args, "vram_budget", None) == 0:
        raise UsageError("--vram-budget must be positive: e.g. --vram-budget 6GiB")
    group = getattr(args, "quant_group", -1)
    if group != -1 and group < 1:
        raise UsageError(f"--quant-group must be a positive group size or -1, got {group}")


def check_sampling_args(args: argparse.Namespace) -> None:
    """UsageError for sampling flags out of range, worded with the flag names."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    t = args.temperature
    if not (math.isfinite(t) and t >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1] (1 disables it), got {args.top_p}")
    if not 0.0 <= args.min_p < 1.0:
        raise UsageError(f"--min-p must be in [0, 1) (0 disables it), got {args.min_p}")
    r = args.repetition_penalty
    if not (math.isfinite(r) and r > 0):
        raise UsageError(f"--repetition-penalty must be > 0 (1 disables it), got {r}")
    seed = getattr(args, "seed", None)
    if seed is not None and not -2**63 <= seed <= 2**64 - 1:  # engine.sampling.SEED_MIN / MAX (that imports torch)
        raise UsageError(f"--seed must fit 64 bits (from -2**63 to 2**64 - 1), got {seed}")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop needs a non-empty string")


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt (repeatable) and --prompts-file (one per line); None = interactive chat."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"--prompts-file {args.prompts_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompts-file {args.prompts_file}: not UTF-8 text") from None
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file} has no non-empty line")
    texts = [("--system", getattr(args, "system", None) or "")]
    texts += [(f"prompt {i + 1}", p) for i, p in enumerate(prompts)]
    for what, text in texts:
        if problem := utf8_problem(text):
            raise UsageError(f"{what} is not UTF-8 text: {problem}; check the terminal's encoding (locale)")
    if not prompts and args.prompt is None and not args.prompts_file:
        return None
    if args.no_chat and any(p == "" for p in prompts):
        raise UsageError("--prompt is empty: with --no-chat the prompt is sent raw and needs at least one token")
    return prompts


def check_args(args: argparse.Namespace) -> list[str] | None:
    """Every check on the flags and prompts that needs no model; returns the prompts (None = chat)."""
    check_engine_args(args)
    check_sampling_args(args)
    prompts = read_prompts(args)
    if prompts is None and args.json:
        raise UsageError("--json needs --prompt or --prompts-file (the interactive chat prints text)")
    if prompts is None and args.batch not in (None, 1):
        raise UsageError("--batch applies to --prompt / --prompts-file, not to the interactive chat")
    return prompts
