"""What ``layerstream`` prints: the plan summary, stats lines with the finish reason, the replies, the JSON."""

from __future__ import annotations

import json
import sys
import textwrap

from memory.units import format_size

# planner notes that explain a default rather than ask for anything; shown with --show-plan and -v only
_INFO_NOTES = ("no VRAM budget and no device memory figure", "host budget:", "step time is an HBM estimate",
               "host lane", "GGUF:", "prompt states")
EMPTY_REPLY = "(empty reply: the model's first token was end-of-sequence)"


def actionable_notes(notes: tuple[str, ...] | list[str]) -> list[str]:
    """The notes that tell the user something to act on (clamped budget, disk reads, context too long ...)."""
    return [n for n in notes if not n.startswith(_INFO_NOTES)]


def plan_summary(engine, full: bool = False) -> str:
    """The plan in one line (plus actionable notes), or the whole table with ``full``; CPU runs get no
    GPU step-time prediction."""
    p, cpu = engine.plan, engine.device.type == "cpu"
    if full:
        table = p.table()
        if cpu:
            table = "\n".join("predicted        : none for a CPU run (the estimate models a GPU's copy engine)"
                              if line.startswith("predicted ") else line for line in table.splitlines())
        lane = getattr(getattr(engine, "model", None), "host", None)  # engine.host_lane: where it runs
        return table + (f"\n{lane.describe()}" if lane is not None else "")
    quant = (engine.quant_note,) if getattr(engine, "quant_note", None) else ()  # how long repacking took
    notes = "".join(f"note: {n}\n" for n in (*actionable_notes(p.notes), *quant))
    n = engine.cfg.num_hidden_layers
    host = f"; {len(p.host_layers)} of them computed on the CPU in decode steps" if p.host_layers else ""
    if cpu:
        head = f"plan: CPU run in {p.dtype}, {len(p.resident_layers)}/{n} layers resident"
        if p.streamed_layers:
            head += (f", {len(p.streamed_layers)} copied in per step ({len(p.disk_layers)} of them read from disk"
                     f"{host}); on the CPU streaming only saves RAM, it does not speed anything up")
        return notes + head
    host = f", {len(p.host_layers)} computed on the CPU" if p.host_layers else ""
    host += ", prompt states in host memory" if p.prefill_state_place == "host" else ""
    return notes + (f"plan: {len(p.resident_layers)}/{n} layers resident{host}, "
                    f"{format_size(p.streamed_bytes_per_step)} streamed per step, predicted "
                    f"{p.predicted_step_s * 1e3:.1f} ms/step = {p.predicted_tok_s:.2f} tok/s "
                    f"(batch {p.batch}, {p.step_bound} bound)")


def finish_text(reason: str, args) -> str:
    """eos | stop | length (...) | interrupted, from generate's finish reason."""
    if reason == "max_new_tokens":
        return f"length (--max-new-tokens {args.max_new_tokens})"
    if reason == "length":
        return f"length (context full: --max-context {args.max_context})"
    return reason


def stats_line(stats: dict, reason: str | None = None, args=None) -> str:
    """``finish: eos | 12 prompt + 30 new tokens | prefill ... | decode ... | peak VRAM ... | host RSS ...``."""
    parts = [f"finish: {finish_text(reason, args)}"] if reason else []
    parts.append(f"{stats['prompt_tokens']} prompt + {stats['generated_tokens']} new tokens")
    parts.append(f"prefill {stats['prefill_tok_s']:.1f} tok/s")
    parts.append(f"decode {stats['decode_tok_s']:.2f} tok/s" if stats["decode_tok_s"] > 0 else "decode -")
    if "peak_vram_bytes" in stats:
        parts.append(f"peak VRAM {format_size(stats['peak_vram_bytes'])}")
    parts.append(f"host RSS {format_size(stats['host_rss_bytes'])}")
    return " | ".join(parts)


def print_reply_end(gen, args, streamed: bool) -> None:
    """After a streamed reply: end the line (or say it was empty) and print the stats line to stderr."""
    if gen.token_ids[0]:
        if streamed:
            print(flush=True)
    else:
        print(EMPTY_REPLY, file=sys.stderr)
    print(stats_line(gen.stats, gen.finish_reasons[0], args), file=sys.stderr)


def print_results(engine, args, prompts: list[str], results: list, is_default: bool) -> None:
    """Every reply (stdout) with its finish reason (stderr), or one JSON object with ``--json``."""
    seqs = [(ids[i], gen, i) for ids, gen in results for i in range(len(ids))]
    if args.json:
        _print_json(engine, prompts, results, seqs, is_default)
        return
    if len(seqs) == 1:
        print_reply_end(results[0][1], args, streamed=True)
        return
    for k, (_, gen, i) in enumerate(seqs):
        head = textwrap.shorten(prompts[k], 60, placeholder="...")
        print(f"--- reply {k + 1}/{len(seqs)} to: {head}", file=sys.stderr, flush=True)
        print(gen.texts[i] if gen.token_ids[i] else "", flush=True)
        if not gen.token_ids[i]:
            print(EMPTY_REPLY, file=sys.stderr)
        print(f"finish: {finish_text(gen.finish_reasons[i], args)}", file=sys.stderr, flush=True)
    for _, gen in results:
        print(stats_line(gen.stats, None, args), file=sys.stderr)


def _print_json(engine, prompts, results, seqs, is_default) -> None:
    first_ids, first, _ = seqs[0]
    out = {"model": str(engine.model_dir), "random_weights": is_default, "prompt_token_ids": first_ids,
           "token_ids": first.token_ids[0], "text": first.texts[0], "finish_reason": first.finish_reasons[0],
           "stats": first.stats, "plan": engine.plan.to_dict()}
    if len(seqs) > 1:
        out["results"] = [{"prompt": prompts[k], "prompt_token_ids": ids, "token_ids": gen.token_ids[i],
                           "text": gen.texts[i], "finish_reason": gen.finish_reasons[i]}
                          for k, (ids, gen, i) in enumerate(seqs)]
        out["group_stats"] = [gen.stats for _, gen in results]
    print(json.dumps(out))
