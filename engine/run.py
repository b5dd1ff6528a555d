"""Command line: ``layerstream [--model M] [--prompt TEXT] [--vram-budget 6GB] ...`` (or ``python -m engine.run``).

Nothing heavy is imported before the flags are parsed and checked, so ``--help`` and a mistyped
flag answer at once; the engine (torch, the kernels) is imported only to run.
"""

from __future__ import annotations

import logging
import sys

from engine.cli_args import PROG, CliParser, UsageError, add_engine_args, check_args
from engine.interrupts import deferred_interrupts, forget_handled_interrupt

DESCRIPTION = """\
Run a causal LLM (Qwen2/2.5/3, Llama 2/3/3.1, Mistral; safetensors or GGUF) that may be larger than the
GPU's memory: the layers that do not fit a --vram-budget stream from pinned host memory (or from
the checkpoint on disk) while the GPU computes. With no --model it runs a tiny random-weight model
(its text is gibberish); with no --prompt it is an interactive chat. Tokens stream to stdout; the
plan, notes and a stats line go to stderr."""

EPILOG = """\
examples:
  layerstream --prompt "Hello"                              tiny built-in model, one reply
  layerstream --model Qwen/Qwen2.5-7B-Instruct --vram-budget 6GB --prompt "Why is the sky blue?"
  layerstream --model qwen2.5-7b --vram-budget 6GiB         chat (Ctrl-D quits, Ctrl-C stops a reply)
  layerstream --model DIR --prompt "a" --prompt "b" --json  two prompts decoded together, one JSON object
  layerstream --model DIR --prompts-file prompts.txt --batch 8 --temperature 0.7 --seed 1
  layerstream --model DIR --vram-budget 6GB --prompt Hi --show-plan   what is resident, streamed, and why

--model takes a directory (config.json, *.safetensors, tokenizer.json), a repo id in the local
Hugging Face cache (get one with: hf download Qwen/Qwen2.5-7B-Instruct) or an alias such as
qwen2.5-7b. Nothing is downloaded and no remote code runs."""


def build_parser() -> CliParser:
    """The ``layerstream`` flags."""
    p = CliParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--model", metavar="M", help="model directory, HF repo id (Qwen/Qwen2.5-7B-Instruct), alias "
                   "(qwen2.5-7b) or a llama.cpp .gguf file (split sets: the first part); default: a tiny "
                   "random-weight model synthesized once into ~/.cache/layerstream")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text (repeatable: several prompts are decoded together); absent: interactive chat")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (blank lines skipped)")
    p.add_argument("--system", metavar="TEXT", help="system message for the chat template")
    p.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below P x the top probability; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R (>1 discourages repeats); 1 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the reply contains STR (repeatable); EOS ids come from generation_config.json")
    add_engine_args(p)
    p.add_argument("--show-plan", action="store_true",
                   help="print the whole memory plan (what is resident, streamed, from where, and why)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (token_ids, text, "
                   "finish_reason, stats, plan); needs --prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="log the planner's and loader's details to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, check, then run; returns the exit code (2 for bad input, with one ``error:`` line).
    ``layerstream serve ...`` starts the OpenAI-compatible server instead (``engine.serve``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from engine.serve import main as serve_main  # light: it imports torch itself, holding Ctrl-C meanwhile
        return serve_main(argv[1:], prog="layerstream serve")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        prompts = check_args(args)
    except UsageError as e:
        return _usage_exit(parser, str(e))
    except SystemExit as e:  # --help, or a parse error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    with deferred_interrupts() as interrupted:  # Ctrl-C while torch imports: acted on once it is imported
        from engine.cli_session import main_session  # heavy: torch, the engine (seconds on a cold disk)
    if interrupted.is_set():
        print("\ninterrupted", file=sys.stderr)
        return 130
    return main_session(args, prompts)


def _usage_exit(parser: CliParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as e:
        return int(e.code)
    raise AssertionError("CliParser.error returns only by SystemExit")


if __name__ == "__main__":
    code = main()
    forget_handled_interrupt()  # a Ctrl-C handled above still exits with its code
    sys.exit(code)
