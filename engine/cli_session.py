"""What ``layerstream`` does once its flags are checked: resolve, preflight, load, plan, generate, report.

``add_engine_args`` / ``options_from_args`` / ``load_engine`` are shared by the other
command-line tools (memreport, benchmarks) so every tool reads budgets the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from engine.cli_args import SIZE_HELP, UsageError, add_engine_args  # noqa: F401  (re-exported for tools)
from engine.cli_output import plan_summary, print_results
from engine.engine import Engine, EngineOptions, ModelFiles, open_model
from engine.options import fit_context, pick_device
from engine.preflight import Machine, PlanBytes, cpu_dtype_note, default_host_budget

BUDGET_HELP = SIZE_HELP
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DEFAULT_MAX_BATCH = 8  # --batch default: the number of prompts, at most this


def options_from_args(args: argparse.Namespace, n_prompts: int = 1) -> EngineOptions:
    """EngineOptions from checked flags; UsageError for a device/kernels/threads mismatch, before any loading."""
    device = pick_device(args.device)  # fails when CUDA is asked for and absent
    if args.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--kernels triton needs a CUDA GPU and this run is on the CPU: use --kernels torch "
                         "(or auto)")
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    host = args.host_budget
    if host is None:
        host = default_host_budget(Machine.probe(device.type), args.vram_budget)
    batch = args.batch or max(1, min(n_prompts, DEFAULT_MAX_BATCH))
    return EngineOptions(device=args.device, dtype=args.dtype, kernels=args.kernels, vram_budget=args.vram_budget,
                         host_budget=host, host_budget_auto=args.host_budget is None, batch=batch,
                         max_context=args.max_context or EngineOptions.max_context,
                         max_context_auto=args.max_context is None,
                         prefill_chunk=args.prefill_chunk or EngineOptions.prefill_chunk,
                         prefill_chunk_auto=args.prefill_chunk is None, threads=threads or EngineOptions.threads,
                         quantize=getattr(args, "quantize", None), quant_group=getattr(args, "quant_group", 128),
                         quant_cache=getattr(args, "quant_cache", False),
                         host_compute=getattr(args, "host_compute", "off"),
                         prefill_states=getattr(args, "prefill_states", "auto"))


def choose_cpu_dtype(files: ModelFiles, opts: EngineOptions, host_budget_given: bool) -> str | None:
    """With ``--dtype auto`` on the CPU: keep fp32 unless it does not fit RAM (or would read layers from
    disk every step); then compute in the checkpoint's dtype. Sets ``opts.dtype``; returns the note to print."""
    if opts.dtype != "auto" or pick_device(opts.device).type != "cpu" or files.ckpt.dtype == torch.float32:
        return None
    from engine.footprint import plan_model
    from engine.host_ram import host_extras
    from engine.quant.checkpoint import layer_quant
    from engine.quant.ggml import dequant_scratch
    machine = Machine.probe("cpu")
    quant = layer_quant(files.ckpt, files.cfg, files.quant, opts.quantize, opts.quant_group)  # bad flags: an error
    if quant is not None:
        dequant_scratch()  # a bad LAYERSTREAM_DEQUANT_SCRATCH: its own error, not a reason for the dtype below
    try:
        plan = plan_model(files.cfg, {n: i.nbytes for n, i in files.ckpt.tensors.items()}, torch.float32, quant,
                          vram_budget=opts.vram_budget, host_budget=opts.host_budget, batch=opts.batch,
                          max_context=opts.max_context, prefill_chunk=opts.prefill_chunk,
                          auto_chunk=opts.prefill_chunk_auto, prefill_states=opts.prefill_states)
        fp32 = PlanBytes.of(host_extras(files.ckpt, files.cfg, torch.float32, torch.device("cpu"), opts.threads,
                                        quant, opts.quant_cache)(plan))
        file_dtype = "bfloat16" if files.ckpt.dtype == torch.bfloat16 else "float16"
        note = cpu_dtype_note(fp32, machine, file_dtype, host_budget_given)
    except ValueError as e:  # the budget cannot even hold an fp32 layer pair
        note = f"computing in the checkpoint's dtype instead of fp32 (the CPU default): {e}"
    if note is not None:
        opts.dtype = DTYPE_NAMES[files.ckpt.dtype]
    else:
        opts.dtype = "fp32"
    return note


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
              "(its text is gibberish). Use --model DIR|ORG/NAME|alias for a real model.", file=sys.stderr)
    if not quiet and first_tuning(opts):
        from kernels.tuning_cache import cache_dir
        print("note: first run with this GPU and software: kernels are compiled and tuned on first use "
              f"(about 35 s more on an H100); later runs reuse them ({cache_dir()})", file=sys.stderr)
    bar = tqdm(total=0, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
               disable=quiet, leave=False, delay=0.5)  # shown only when loading takes a while
    try:
        engine = Engine(files, opts, progress=bar.update)
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


def prompt_ids(tok, args, messages: list[dict]) -> list[int]:
    """Token ids of a conversation (chat template) or, with --no-chat, of the last message's raw text."""
    if args.no_chat:
        return tok.encode(messages[-1]["content"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _encode_prompts(files: ModelFiles, args, prompts: list[str], max_context: int) -> list[list[int]]:
    out = []
    for text in prompts:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = prompt_ids(files.tokenizer, args, messages + [{"role": "user", "content": text}])
        if not ids:
            raise UsageError("the prompt encodes to no tokens: give some text")
        if len(ids) >= max_context:
            raise UsageError(f"prompt has {len(ids)} tokens but the context holds {max_context}: shorten the "
                             "prompt or raise --max-context")
        out.append(ids)
    return out


def _generate(engine: Engine, args, prompts: list[list[int]], echo: bool, seeds: list[int] | None = None):
    """``prompts`` decoded together with the flags' sampling; ``seeds``: each row's (default: from ``--seed``)."""
    from engine.generate import generate
    from engine.sampling import SamplingParams
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)

    def on_text(i: int, text: str) -> None:
        if echo and i == 0:
            sys.stdout.write(text)
            sys.stdout.flush()

    return generate(engine, prompts, params, args.max_new_tokens, args.stop, on_text, seeds)


def run_session(args: argparse.Namespace, opts: EngineOptions, prompts: list[str] | None) -> int:
    """The prompts (decoded ``opts.batch`` at a time), or an interactive chat when ``prompts`` is None."""
    model_dir, is_default = resolve_or_default(args.model)
    files = open_model(model_dir)  # headers and tokenizer only: bad input fails before any weight is read
    fit_context(files.cfg, opts)
    args.max_context = opts.max_context  # what the finish line names
    ids = None if prompts is None else _encode_prompts(files, args, prompts, opts.max_context)
    note = choose_cpu_dtype(files, opts, args.host_budget is not None)
    if note and not args.json:
        print(f"note: {note}", file=sys.stderr)
    if ids is not None:
        if len(ids) == 1 and opts.batch > 1:  # one prompt, a larger batch: decode it opts.batch times
            prompts, ids = prompts * opts.batch, ids * opts.batch
        opts.first_prompts = tuple(len(p) for p in ids[:opts.batch])  # its prefill compiles ahead at load
    engine, _ = load_engine(args.model, opts, quiet=args.json, resolved=(files, is_default))
    try:
        if not args.json:
            print(plan_summary(engine, args.show_plan), file=sys.stderr)
        if ids is None:
            from engine.chat import chat
            return chat(engine, args, lambda p: _generate(engine, args, [p], echo=True))
        from engine.sampling import row_seeds
        seeds = None if args.seed is None else row_seeds(ids, args.seed)  # over every group: a prompt's own seed
        results = []
        for i in range(0, len(ids), opts.batch):
            group = ids[i:i + opts.batch]
            results.append((group, _generate(engine, args, group, echo=len(ids) == 1 and not args.json,
                                             seeds=None if seeds is None else seeds[i:i + opts.batch])))
        print_results(engine, args, prompts, results, is_default)
        return 0
    finally:
        engine.close()


def main_session(args: argparse.Namespace, prompts: list[str] | None) -> int:
    """``run_session`` with every expected failure turned into one ``error:`` line and an exit code."""
    from engine.generate import NonFiniteLogits

    try:
        return run_session(args, options_from_args(args, len(prompts or [None])), prompts)
    except UsageError as e:
        print(f"error: {e} (see layerstream --help)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLogits as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({str(e).splitlines()[0]}). With --vram-budget the engine's CUDA "
              "allocator is held to the budget: raise --vram-budget, or lower --max-context, --batch or "
              "--prefill-chunk; `python tools/memreport.py` with the same flags shows where the memory goes",
              file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of RAM while running (the preflight check passed, so something else took memory "
              "meanwhile): lower --vram-budget / --host-budget on the CPU, or --max-context / --batch",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "can't allocate" not in str(e) and "DefaultCPUAllocator" not in str(e):
            raise
        print(f"error: out of RAM ({str(e).splitlines()[0]}): lower --vram-budget / --host-budget on the CPU, "
              "or --max-context / --batch", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
