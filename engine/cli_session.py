"""What ``engine.run`` does once its flags are parsed: load, plan, generate, report.

``add_engine_args`` / ``options_from_args`` / ``load_engine`` are shared by the other
command-line tools (memreport, benchmarks) so every tool reads budgets the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.engine import Engine, EngineOptions, ModelFiles, open_model, pick_device
from memory.units import format_size, parse_size

BUDGET_HELP = ("sizes accept 6GB (10^9 bytes), 6GiB (2^30 bytes), 6000MB, 512MiB, 0.5TB or plain bytes")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags that shape the engine: device, dtype, kernels, budgets, context, batch."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="triton (default on CUDA) or the plain-torch reference path")
    p.add_argument("--vram-budget", help=f"GPU memory the engine may use; {BUDGET_HELP}")
    p.add_argument("--host-budget", help="pinned host memory for streamed layers (default: available RAM "
                   "minus a margin); streamed layers beyond it are read from disk")
    p.add_argument("--max-context", type=int, default=4096, help="KV-cache length per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens per prefill pass (sizes the activation workspace; longer prompts take more passes)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="round the layers' linear weights to nearest at load (a bf16/fp16 checkpoint); "
                   "quantized checkpoints (AWQ, GPTQ, compressed-tensors) are detected without it")
    p.add_argument("--quant-group", type=int, default=128,
                   help="--quantize group size along the input dim (-1: one scale per output row)")
    p.add_argument("--quant-cache", action="store_true",
                   help="keep the repacked (AWQ / GPTQ) or --quantize'd layers in a cache file (the size of the "
                   "packed layers) so later runs and disk-tier streaming read them without converting again")


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    """EngineOptions from parsed flags; ValueError with the accepted forms on a bad size."""
    pick_device(args.device)  # fail before any loading when CUDA is asked for and absent
    for flag in ("batch", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_context < 2:
        raise ValueError(f"--max-context must be at least 2, got {args.max_context}")
    if args.quant_group != -1 and args.quant_group < 1:
        raise ValueError(f"--quant-group must be a positive group size or -1, got {args.quant_group}")
    return EngineOptions(
        device=args.device, dtype=args.dtype, kernels=args.kernels,
        vram_budget=parse_size(args.vram_budget) if args.vram_budget else None,
        host_budget=parse_size(args.host_budget) if args.host_budget else None,
        batch=args.batch, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
        quantize=args.quantize, quant_group=args.quant_group, quant_cache=args.quant_cache)


def resolve_or_default(spec: str | None) -> tuple[Path, bool]:
    """(model dir, is the embedded random-weight default)."""
    from engine.resolve import default_model_dir, resolve_model
    if spec:
        return resolve_model(spec), False
    target = default_model_dir()
    if not (target / "config.json").is_file():
        from engine.synth.writer import synthesize
        print(f"synthesizing the embedded default model into {target} (once)", file=sys.stderr)
        synthesize("default", target, dtype="bf16", seed=0, force=True)
    return target, True


def load_engine(spec: str | None, opts: EngineOptions, quiet: bool = False,
                resolved: tuple[Path | ModelFiles, bool] | None = None) -> tuple[Engine, bool]:
    """Resolve ``spec`` (unless ``resolved`` is given) and load it with a progress bar on stderr."""
    from tqdm import tqdm
    model_dir, is_default = resolved or resolve_or_default(spec)
    files = model_dir if isinstance(model_dir, ModelFiles) else open_model(model_dir)
    if is_default and not quiet:
        print("note: no --model given; running the embedded default, a tiny model with RANDOM weights "
              "(its text is meaningless). Use --model DIR|ORG/NAME|alias for a real model.", file=sys.stderr)
    if not quiet and first_tuning(opts):
        from kernels.tuning_cache import cache_dir
        print("note: first run with this GPU and software: kernels are compiled and tuned on first use "
              f"(about 35 s more on an H100); later runs reuse them ({cache_dir()})", file=sys.stderr)
    bar = tqdm(total=0, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
               disable=quiet, leave=False, delay=0.5)  # shown only when loading takes a while

    def progress(n: int) -> None:
        bar.update(n)

    try:
        engine = Engine(files, opts, progress=progress)
    finally:
        bar.close()
    return engine, is_default


def first_tuning(opts: EngineOptions) -> bool:
    """Whether this run will tune Triton kernels from scratch (CUDA, triton kernels, no cached results)."""
    device = pick_device(opts.device)
    if device.type != "cuda" or opts.kernels == "torch":
        return False
    from kernels.tuning_cache import enabled, has_entries
    return enabled(device) and not has_entries(device)


def plan_summary(engine: Engine) -> str:
    p = engine.plan
    notes = "".join(f"note: {n}\n" for n in p.notes + ((engine.quant_note,) if engine.quant_note else ()))
    head = (f"plan: {len(p.resident_layers)}/{engine.cfg.num_hidden_layers} layers resident, "
            f"{format_size(p.streamed_bytes_per_step)} streamed per step")
    if engine.device.type == "cpu":
        return notes + head + " (CPU run: step-time predictions are for a GPU; see --show-plan)"
    return notes + head + (f", predicted {p.predicted_step_s * 1e3:.1f} ms/step = {p.predicted_tok_s:.2f} tok/s "
                           f"(batch {p.batch}, {p.step_bound} bound)")


def stats_line(stats: dict) -> str:
    parts = [f"prefill {stats['prefill_tok_s']:.1f} tok/s", f"decode {stats['decode_tok_s']:.2f} tok/s"]
    if "peak_vram_bytes" in stats:
        parts.append(f"peak VRAM {format_size(stats['peak_vram_bytes'])}")
    parts.append(f"host RSS {format_size(stats['host_rss_bytes'])}")
    return " | ".join(parts)


def _prompt_ids(tok, args, messages: list[dict]) -> list[int]:
    if args.no_chat:
        return tok.encode(messages[-1]["content"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _generate(engine: Engine, args, ids: list[int], echo: bool):
    from engine.generate import generate
    from engine.sampling import SamplingParams
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)

    def on_text(i: int, text: str) -> None:
        if echo and i == 0:
            sys.stdout.write(text)
            sys.stdout.flush()

    return generate(engine, [ids] * args.batch, params, args.max_new_tokens, args.stop, on_text)


def run_session(args: argparse.Namespace, opts: EngineOptions) -> int:
    """One prompt (or an interactive chat when --prompt is absent)."""
    model_dir, is_default = resolve_or_default(args.model)
    files = open_model(model_dir)  # headers and tokenizer only: bad input fails before any weight is read
    ids = None
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = _prompt_ids(files.tokenizer, args, messages)
        if len(ids) >= opts.max_context:
            raise ValueError(f"prompt has {len(ids)} tokens but the context holds {opts.max_context}: "
                             "shorten the prompt or raise --max-context")
    engine, _ = load_engine(args.model, opts, quiet=args.json, resolved=(files, is_default))
    if args.show_plan:
        print(engine.plan.table(), file=sys.stderr)
    elif not args.json:
        print(plan_summary(engine), file=sys.stderr)
    if ids is None:
        return _chat(engine, args)
    gen = _generate(engine, args, ids, echo=not args.json)
    if args.json:
        out = {"model": str(engine.model_dir), "random_weights": is_default, "prompt_token_ids": ids,
               "token_ids": gen.token_ids[0], "text": gen.texts[0], "finish_reason": gen.finish_reasons[0],
               "stats": gen.stats, "plan": engine.plan.to_dict()}
        print(json.dumps(out))
    else:
        print(file=sys.stdout)
        print(stats_line(gen.stats), file=sys.stderr)
    return 0


def _chat(engine: Engine, args) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    print("interactive chat: type a message, Ctrl-D to quit, Ctrl-C to stop a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        gen = _generate(engine, args, _prompt_ids(engine.tokenizer, args, messages), echo=True)
        print()
        print(stats_line(gen.stats), file=sys.stderr)
        messages.append({"role": "assistant", "content": gen.texts[0]})
