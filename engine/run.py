"""Command line: ``python -m engine.run [--model M] [--prompt TEXT] [--vram-budget 6GB] ...``

With no ``--model`` it runs an embedded default (a tiny random-weight Qwen2.5-shaped
model, synthesized once into a cache directory). With no ``--prompt`` it is an
interactive multi-turn chat. Tokens stream to stdout; stats go to stderr, or into the
single JSON object printed with ``--json``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from engine.cli_session import add_engine_args, options_from_args, run_session

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory, HF repo id (Qwen/Qwen2.5-7B-Instruct), alias (qwen2.5-7b) "
                   "or a llama.cpp .gguf file (split sets: the first part); default: an embedded tiny "
                   "random-weight model")
    p.add_argument("--prompt", help="prompt text; absent: interactive chat")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_engine_args(p)
    p.add_argument("--show-plan", action="store_true", help="print the whole memory plan")
    p.add_argument("--json", action="store_true", help="print one JSON object (token_ids, text, stats)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_session(args, options_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({str(e).splitlines()[0]}). With --vram-budget the engine's CUDA "
              "allocator is held to the budget: raise --vram-budget, or lower --max-context, --batch or "
              "--prefill-chunk; `python tools/memreport.py` with the same flags shows where the memory goes",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
