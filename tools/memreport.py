"""Where did my memory go, and why is it this slow? VRAM and host memory by category, the plan per
module with what would have to give for one more resident layer, and (CUDA) copy vs compute per
decode step and layer: stalls, achieved GB/s, predicted vs measured tok/s.

    python tools/memreport.py --model M --vram-budget 6GB [--batch B] [--context N] [--steps N]
                              [--json] [--out-dir DIR]
    python tools/memreport.py --plan-only (--model M | --preset qwen2.5-72b) --gpu-memory 24GB
                              --host-memory 64GB [--h2d-gbps 25] [--disk-gbps 3]

Writes memory.png, and on CUDA timeline.png (the traced prefill and the last two decode steps, copy
above compute per layer, stalls marked) and trace.json / prefill-trace.json (Perfetto), to --out-dir.
--plan-only reads only safetensors headers (or, with --preset, nothing) and needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tools/memreport.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from engine.cli_args import CliParser  # noqa: E402
from engine.cli_session import BUDGET_HELP, add_engine_args, load_engine, options_from_args, resolve_or_default  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.engine import EngineOptions, open_model  # noqa: E402
from engine.options import pick_dtype  # noqa: E402
from engine.footprint import tensor_bytes_from_config  # noqa: E402
from engine.quant.checkpoint import layer_quant, rtn_quant  # noqa: E402
from memory.bandwidth import DEFAULT_H2D_GBPS, DEFAULT_SOURCE, default_cache_path, device_key, load_cache  # noqa: E402
from memory.units import format_size  # noqa: E402
from streamer.trace import write_chrome_trace  # noqa: E402
from tools import report_render  # noqa: E402
from tools.memreport_measure import cuda_snapshot, decode_run, measure_host, measure_vram  # noqa: E402
from tools.memreport_timeline import analyze_timeline, summarize  # noqa: E402
from tools.timeline_spans import prefill_phase  # noqa: E402
from tools.memreport_plan import PlanInputs, module_rows, plan_categories, what_if  # noqa: E402

SCHEMA = "layerstream.memreport/1"
WHAT_IF_FLAGS = ("gpu_memory", "host_memory", "h2d_gbps", "disk_gbps")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python tools/memreport.py", description=__doc__.split("\n\n")[0],
                  epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", help="model directory, HF repo id or alias (default: the embedded tiny model)")
    p.add_argument("--preset", help="with --plan-only: an engine.synth.presets name (e.g. qwen2.5-72b), no checkpoint needed")
    p.add_argument("--plan-only", action="store_true", help="plan and predict only: no GPU, no weights read")
    add_engine_args(p)
    p.set_defaults(batch=1)
    p.add_argument("--context", dest="max_context", type=int, default=argparse.SUPPRESS,
                   help="KV-cache length per sequence (same as --max-context)")
    p.add_argument("--steps", type=int, default=8, help="decode steps of the timed run (the last few are traced)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the timed run")
    p.add_size_argument("--gpu-memory", help=f"--plan-only: the card's memory for the what-if (used as free memory); "
                        f"{BUDGET_HELP}")
    p.add_size_argument("--host-memory", help="--plan-only: host RAM for the what-if (host budget = it minus "
                   "max(2 GiB, 10%%), unless --host-budget)")
    p.add_argument("--h2d-gbps", type=float, help="--plan-only: host-to-device GB/s (default: this GPU's cached "
                   "measurement, else 25)")
    p.add_argument("--disk-gbps", type=float, help="--plan-only: checkpoint read GB/s, to predict disk-tier steps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--out-dir", default="memreport-out", help="where memory.png, timeline.png, trace.json go")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _size(args, flag: str) -> int | None:
    """A size flag's bytes (parsed by the flag's type) or None."""
    return getattr(args, flag)


def _check(args) -> None:
    if args.model and args.preset:
        raise ValueError("give --model or --preset, not both")
    if args.preset and not args.plan_only:
        raise ValueError(f"--preset needs --plan-only (there are no weights to run); to run it, synthesize one: "
                         f"python -m tools.synth --preset {args.preset} --out DIR, then --model DIR")
    given = [f for f in WHAT_IF_FLAGS if getattr(args, f) is not None]
    if given and not args.plan_only:
        raise ValueError(f"--{given[0].replace('_', '-')} is a --plan-only what-if; a real run measures the "
                         "GPU, RAM and bandwidth")
    for flag, low in (("steps", 2), ("prompt_tokens", 1), ("prefill_chunk", 1), ("max_context", 2), ("batch", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    for flag in ("h2d_gbps", "disk_gbps"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")


def _h2d_default() -> tuple[float, str]:
    if not torch.cuda.is_available():
        return DEFAULT_H2D_GBPS, DEFAULT_SOURCE
    hit = load_cache(default_cache_path()).get(device_key(torch.device("cuda", torch.cuda.current_device())))
    if hit:
        return float(hit["gbps"]), f"cached from {hit.get('measured_at', 'an unknown date')}"
    return DEFAULT_H2D_GBPS, "default 25 GB/s (this GPU not measured yet: a run without --plan-only measures it)"


def _model_info(cfg: ModelConfig, source: str, file_dtype: torch.dtype, tensor_bytes: dict[str, int]) -> dict:
    return {"source": source, "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "tied": cfg.tie_word_embeddings,
            "file_dtype": str(file_dtype).removeprefix("torch."), "file_bytes": sum(tensor_bytes.values())}


def _plan_only(args, notes: list[str]) -> tuple[dict, PlanInputs, int | None, int | None]:
    """(model info, plan inputs, device free, card total) from headers or a preset, for any machine."""
    if args.preset:
        from engine.synth.presets import PRESETS, resolve_preset
        from engine.synth.writer import build_config
        key = resolve_preset(args.preset)
        if key is None:
            raise ValueError(f"unknown --preset {args.preset!r}; known presets: {', '.join(PRESETS)}")
        cfg, file_dtype = ModelConfig.from_dict(build_config(key, "bf16")), torch.bfloat16
        tensor_bytes, source = tensor_bytes_from_config(cfg, file_dtype), f"preset {key} (no checkpoint)"
        quant = rtn_quant(cfg, args.quantize, args.quant_group, file_dtype) if args.quantize else None
    else:
        model_dir, _ = resolve_or_default(args.model)
        files = open_model(model_dir)  # headers only (a model directory or a GGUF file)
        cfg, ckpt = files.cfg, files.ckpt
        quant = layer_quant(ckpt, cfg, files.quant, args.quantize, args.quant_group)
        tensor_bytes, file_dtype, source = {n: i.nbytes for n, i in ckpt.tensors.items()}, ckpt.dtype, str(model_dir)
    gpu = _size(args, "gpu_memory")
    local = torch.cuda.is_available() and args.device != "cpu"
    free, total = torch.cuda.mem_get_info() if local and gpu is None else (gpu, gpu)
    if gpu is not None:
        notes.append(f"--gpu-memory {format_size(gpu)} is planned as free memory; a real card loses a few hundred "
                     "MiB to the CUDA context")
    host_budget, ram = _size(args, "host_budget"), _size(args, "host_memory")
    if host_budget is None and ram is not None:
        margin = max(2 << 30, ram // 10)
        host_budget = max(0, ram - margin)
        notes.append(f"host budget: --host-memory {format_size(ram)} minus a {format_size(margin)} margin = "
                     f"{format_size(host_budget)}")
    h2d = (args.h2d_gbps, "given (--h2d-gbps)") if args.h2d_gbps else _h2d_default()
    dtype = pick_dtype(args.dtype, file_dtype, torch.device("cpu" if args.device == "cpu" else "cuda"))
    kwargs = dict(vram_budget=_size(args, "vram_budget"), host_budget=host_budget, batch=args.batch,
                  max_context=args.max_context or EngineOptions.max_context, prefill_chunk=args.prefill_chunk or 2048,
                  auto_chunk=args.prefill_chunk is None, device_free=free,
                  h2d_gbps=h2d[0], h2d_source=h2d[1], disk_gbps=args.disk_gbps, prefill_states=args.prefill_states)
    inputs = PlanInputs(cfg, tensor_bytes, dtype, kwargs, quant)
    return _model_info(cfg, source, file_dtype, tensor_bytes), inputs, free, total


def _host_planned(plan, rows: list[dict], ram_total: int | None) -> dict:
    return {"host_budget_bytes": plan.host_budget_bytes, "pinned_planned_bytes": plan.host_pinned_bytes,
            "disk_tier_bytes": sum(r["bytes"] for r in rows if r["tier"] == "disk"), "ram_total_bytes": ram_total}


def _full_run(args, notes: list[str]) -> tuple[dict, PlanInputs, dict]:
    """Load the engine, run the traced decode steps, measure; returns (partial report, inputs, spans...)."""
    opts = options_from_args(args)
    opts.trace = True
    if args.device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine, is_default = load_engine(args.model, opts, quiet=args.json)
    try:
        dev, plan = engine.device, engine.plan
        cuda = dev.type == "cuda"
        snaps = {}

        def snap(name: str) -> None:
            if cuda:
                snaps[name] = cuda_snapshot(dev)
                torch.cuda.reset_peak_memory_stats(dev)

        snap("load")
        if not args.json:
            print(f"timing {args.steps} decode steps after a {args.prompt_tokens}-token prompt ...", file=sys.stderr)
        run = decode_run(engine, args.steps, args.prompt_tokens, on_warm=lambda: snap("warmup"))
        vram = measure_vram(engine, snaps["load"], snaps["warmup"], cuda_snapshot(dev)) if cuda else None
        if cuda and plan.h2d_source == "measured now":
            notes.append("the H2D bandwidth was measured during this load: its 1 GiB probe buffer may still be "
                         "cached by the allocator (reserved, not allocated); a second run shows the steady state")
        unit_bytes = {u.name: u.nbytes for u in engine.weights.units}
        timeline = analyze_timeline(run["spans"], run["bounds_ms"], unit_bytes) if run["bounds_ms"] else None
        timing = {"summary": summarize(run, timeline, engine.opts.batch, plan), "timeline": timeline,
                  "prefill": prefill_phase(run["prefill_spans"]).stats() if run["prefill_spans"] else None}
        if not cuda:
            notes.append("copy/compute timeline: not traced on the CPU (it uses CUDA events); step times are "
                         "host wall clock (no GPU prediction on the CPU)")
        if is_default:
            notes.append("no --model: the embedded tiny random-weight model was measured")
        tensor_bytes = {n: i.nbytes for n, i in engine.ckpt.tensors.items()}
        inputs = PlanInputs(engine.cfg, tensor_bytes, engine.dtype,
                            dict(batch=plan.batch, max_context=plan.max_context, prefill_chunk=plan.prefill_chunk,
                                 h2d_gbps=plan.h2d_gbps, h2d_source=plan.h2d_source), engine.quant)
        part = {"mode": "cuda" if cuda else "cpu", "plan_obj": plan,
                "model": _model_info(engine.cfg, str(engine.model_dir), engine.ckpt.dtype, tensor_bytes),
                "measured_vram": vram, "host_measured": measure_host(engine), "timing": timing,
                "card_total": torch.cuda.mem_get_info(dev)[1] if cuda else None}
        return part, inputs, run
    finally:
        engine.close()


def build_report(args) -> tuple[dict, dict[str, list[dict]]]:
    """The report (JSON-serialisable) and the trace spans of the decode steps and of the prefill (for
    timeline.png, trace.json and prefill-trace.json): {"decode": [...], "prefill": [...]}."""
    _check(args)
    notes: list[str] = []
    if args.plan_only:
        info, inputs, free, total = _plan_only(args, notes)
        plan = inputs.plan()
        if plan.disk_bytes_per_step and args.disk_gbps is None:
            notes.append("give --disk-gbps (the checkpoint drive's read speed) to include disk-tier reads in "
                         "the prediction")
        part = {"mode": "plan-only", "model": info, "measured_vram": None, "host_measured": None,
                "timing": None, "card_total": total}
        spans: dict[str, list[dict]] = {"decode": [], "prefill": []}
        notes.append("timing: not measured (--plan-only); the prediction is bytes streamed per step / H2D GB/s")
    else:
        part, inputs, run = _full_run(args, notes)
        plan, free, spans = part.pop("plan_obj"), None, {"decode": run["spans"], "prefill": run["prefill_spans"]}
    rows = module_rows(plan, inputs.tensor_bytes)
    host = _host_planned(plan, rows, None)
    if part["host_measured"]:
        host.update(part["host_measured"], measured=True)
        weights = plan.host_pinned_bytes - plan.prefill_state_host_bytes  # less the prefill's prompt states
        if host["host_copies_bytes"] != weights:
            notes.append(f"the plan counts {format_size(weights)} pinned host memory for weights; the weight "
                         f"manager holds {format_size(host['host_copies_bytes'])} of streamed-weight copies (a "
                         "host-tier embedding is looked up in the mapped checkpoint, not pinned)")
    else:
        ram = _size(args, "host_memory") if args.plan_only else None
        host.update(measured=False, ram_total_bytes=ram or psutil.virtual_memory().total)
    rep = {"schema": SCHEMA, "mode": part["mode"], "model": part["model"],
           "workload": {"dtype": plan.dtype, "batch": plan.batch, "max_context": plan.max_context,
                        "prefill_chunk": plan.prefill_chunk},
           "plan": plan.to_dict(), "plan_table": plan.table(), "modules": rows,
           "vram": {"budget_bytes": plan.budget_bytes, "budget_given": args.vram_budget is not None,
                    "card_total_bytes": part["card_total"],
                    "planned": plan_categories(plan, inputs.cfg), "planned_total_bytes": plan.total_bytes + plan.outside_bytes,
                    "measured": part["measured_vram"]},
           "host": host, "what_if": what_if(inputs, plan, free), "timing": part["timing"],
           "notes": list(plan.notes) + notes, "files": {}}
    return rep, spans


def write_outputs(rep: dict, spans: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = rep["files"]
    files["memory_png"] = str(report_render.save_memory_png(rep, out_dir / "memory.png"))
    tl = (rep["timing"] or {}).get("timeline")
    files["prefill_trace_json"] = None
    if spans["decode"] and tl and tl["steps"]:
        title = f"{Path(str(rep['model']['source'])).name}: {report_render.plan_story(rep).splitlines()[0]}"
        files["timeline_png"] = str(report_render.save_timeline_png(spans["decode"], tl, out_dir / "timeline.png",
                                                                    spans["prefill"], title))
        write_chrome_trace(spans["decode"], out_dir / "trace.json")
        files["trace_json"] = str(out_dir / "trace.json")
        if spans["prefill"]:
            write_chrome_trace(spans["prefill"], out_dir / "prefill-trace.json")
            files["prefill_trace_json"] = str(out_dir / "prefill-trace.json")
    else:
        files["timeline_png"] = files["trace_json"] = None
        why = "--plan-only" if rep["mode"] == "plan-only" else "no CUDA trace (CPU run)"
        rep["notes"].append(f"timeline.png and trace.json not written: {why}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        rep, spans = build_report(args)
        write_outputs(rep, spans, Path(args.out_dir))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({str(e).splitlines()[0]}): lower --vram-budget, --context or --batch",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(json.dumps(rep, default=str) if args.json else report_render.render_text(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
