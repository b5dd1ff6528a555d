"""Synthetic random-weight checkpoints in the exact Hugging Face layout of real models.

    python -m tools.synth --preset qwen2.5-7b --out DIR [--dtype bf16|fp16|fp32] [--seed N]
                          [--layers N] [--device cpu|cuda] [--force] [--max-shard-bytes N]
                          [--quant awq|gptq|gptq8|ct-int4|int8] [--format safetensors|gguf]
                          [--gguf-type Q4_K_M|Q8_0|...] [--gguf-from-floats]

``--quant`` writes the layers' projections quantized, as that format's published checkpoints are
(names, packing, ``quantization_config``, dtypes; see ``engine.synth.quant``). ``--format gguf``
writes DIR/model-<TYPE>.gguf with llama.cpp's layout, metadata and per-tensor types
(engine.gguf.writer): its quantized tensors are random blocks with drawn scales generated on
--device and streamed to the file (engine.gguf.random_writer; a 72B Q4_K_M needs no float model),
or, with --gguf-from-floats, a float checkpoint synthesized then quantized tensor by tensor.

The command line over ``engine.synth`` (presets, tokenizer and writer live there, so the engine
can synthesize its embedded default without reaching up into ``tools/``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

from engine.checkpoint import Checkpoint
from engine.gguf.random_writer import write_random_gguf
from engine.gguf.writer import FILE_TYPES as GGUF_TYPES, describe, write_gguf
from engine.synth.presets import PRESETS
from engine.synth.quant import QUANT_KINDS
from engine.synth.writer import DEFAULT_MAX_SHARD_BYTES, DTYPES, SynthError, check_out, synthesize


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m tools.synth`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m tools.synth", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", help=f"preset or HF repo id ({', '.join(PRESETS)})")
    p.add_argument("--out", type=Path, required=True, help="output directory (must be empty or absent)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--device", default="cpu", help="where random tensors are generated (cpu, cuda, cuda:N)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out that holds a model (config.json "
                   "or a .gguf, e.g. an earlier synthesis); other files and directories are never replaced")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="shard size cap")
    p.add_argument("--quant", choices=QUANT_KINDS, help="write a quantized checkpoint in this published format "
                   "(its unquantized tensors in the format's dtype: fp16 for awq / gptq, bf16 otherwise)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"])
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES),
                   help="GGUF file type (--format gguf; default Q4_K_M): Q4_K_M / Q5_K_M mix Q4_K|Q5_K with Q6_K as "
                        "llama.cpp does")
    p.add_argument("--gguf-from-floats", action="store_true",
                   help="--format gguf: quantize synthesized float weights (slow) instead of writing random blocks")
    return p


def synth_gguf(args: argparse.Namespace) -> Path:
    """Write --out/model-<TYPE>.gguf, staged in a temporary directory beside --out and moved into place.

    By default the preset's config and tokenizer are written (no weights) and the GGUF's tensors are
    random blocks streamed from --device (engine.gguf.random_writer); --gguf-from-floats synthesizes
    the float checkpoint and quantizes it (engine.gguf.writer: slow, the whole model in memory).
    """
    out = Path(args.out)
    check_out(out, args.force)
    tmp = out.parent / f".{out.name}.gguf-tmp-{os.getpid()}"
    src, staged, name = tmp / "src", tmp / "out", f"model-{args.gguf_type}.gguf"
    try:
        synthesize(args.preset, src, args.dtype, args.seed, args.layers, args.device, True, args.max_shard_bytes,
                   progress=True, weights=args.gguf_from_floats)
        staged.mkdir()
        if args.gguf_from_floats:
            write_gguf(src, staged / name, args.gguf_type, progress=True)
        else:
            write_random_gguf(src, staged / name, args.gguf_type, args.seed, args.device, progress=True)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
        return out / name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 usage error)."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.gguf_from_floats and args.format != "gguf":
            raise SynthError("--gguf-from-floats applies to --format gguf only")
        if args.gguf_type and args.format != "gguf":
            raise SynthError("--gguf-type applies to --format gguf (add --format gguf)")
        args.gguf_type = args.gguf_type or "Q4_K_M"
        if args.format == "gguf":
            if args.quant:
                raise SynthError("--quant writes safetensors checkpoints; a GGUF file's types come from --gguf-type")
            path = synth_gguf(args)
            info = describe([path])
            types = ", ".join(f"{n} {k}" for k, n in info["types"].items())
            print(f"wrote {path}: {info['tensors']} tensors ({types}), "
                  f"{info['bytes']:,} bytes in {time.perf_counter() - start:.1f} s")
            return 0
        out = synthesize(args.preset, args.out, args.dtype, args.seed, args.layers, args.device,
                         args.force, args.max_shard_bytes, progress=True, quant=args.quant)
    except (SynthError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    infos = Checkpoint(out).tensors.values()
    nbytes, params = sum(i.nbytes for i in infos), sum(math.prod(i.shape) for i in infos)
    print(f"wrote {out}: {len(infos)} tensors, {params:,} parameters (stored elements), {nbytes:,} bytes "
          f"in {elapsed:.1f} s ({nbytes / max(elapsed, 1e-9) / 1e6:,.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
