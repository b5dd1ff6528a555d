"""Measurements on a loaded engine for ``tools/memreport.py``: VRAM by category, host memory,
and a short traced decode run (``tools/memreport_timeline.py`` turns its spans into stalls and GB/s).

VRAM: the persistent categories are the engine's own tensors (resident layer buffer, staging
slots, KV cache, ...); workspace is the peak allocated bytes minus them. Host: RSS, the host
copies of streamed weights (pinned on CUDA), the disk-tier reader ring, and the resident pages
of the mapped checkpoint shards (``/proc/self/smaps`` Rss of those mappings).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from contextlib import contextmanager

import psutil
import torch

from engine.generate import decode_step, prefill
from engine.quant.ggml import GGMLWeight
from memory.process_vram import nvml_process_used

PROMPT_TEXT = "Explain, step by step, why the sky looks blue on a clear day and red at sunset. "
_SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+\s")


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def logits_bytes(vocab: int, batch: int) -> int:
    """Logits of a decode step, fp32, plus the sampler's scratch copy (as memory.plan budgets them)."""
    return batch * vocab * 4 * 2


# ----- VRAM -----
def cuda_snapshot(dev: torch.device) -> dict[str, int]:
    return {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
            "peak_allocated": torch.cuda.max_memory_allocated(dev),
            "peak_reserved": torch.cuda.max_memory_reserved(dev)}


def persistent_vram(engine) -> dict[str, int]:
    """Bytes of the tensors the engine keeps on the device for the whole run."""
    w, dev = engine.weights, engine.device

    def here(t):
        return nbytes(t) if t is not None and t.device.type == dev.type else 0

    head = w.lm_head
    head = head.parts[0][1] if isinstance(head, GGMLWeight) else head  # GGUF blocks: one part
    same = head is not None and head.data_ptr() == w.embed_table.data_ptr()
    return {"resident layers": here(w.stream.resident_buf), "embedding": here(w.embed_table),
            "lm_head": 0 if same else here(head), "norm": here(w.final_norm), "staging slots": here(w.stream.slots),
            "KV cache": engine.cache.nbytes, "rope tables": here(engine.model.cos) + here(engine.model.sin)}


def measure_vram(engine, after_load: dict[str, int], after_warmup: dict[str, int], after_run: dict[str, int]) -> dict:
    """Measured VRAM on CUDA: categories summing to the steady-state peak allocated bytes (after a warm-up
    pass, whose own peak includes kernel autotuning), allocator slack, CUDA context, other processes."""
    dev, notes = engine.device, []
    persistent = persistent_vram(engine)
    peak = after_run["peak_allocated"]
    rest = max(0, peak - sum(persistent.values()))
    logits = min(rest, logits_bytes(engine.cfg.vocab_size, engine.opts.batch))
    categories = {**persistent, "logits (est.)": logits, "activations/workspace": rest - logits}
    free, total = torch.cuda.mem_get_info(dev)
    used = total - free
    proc, why = nvml_process_used(dev)
    reserved = after_run["reserved"]
    out = {"after_load": after_load, "after_warmup": after_warmup, "after_run": after_run, "categories": categories,
           "categories_total_bytes": sum(categories.values()),
           "allocator_slack_peak_bytes": after_run["peak_reserved"] - after_run["peak_allocated"],
           "allocator_slack_now_bytes": reserved - after_run["allocated"],
           "device_total_bytes": total, "device_used_bytes": used, "process_used_bytes": proc,
           "cuda_context_bytes": None if proc is None else max(0, proc - reserved),
           "other_processes_bytes": None if proc is None else max(0, used - proc),
           "context_and_others_bytes": max(0, used - reserved), "notes": notes}
    jump = after_warmup["peak_allocated"] - peak
    if jump > 16 << 20:
        notes.append(f"the warm-up pass peaked {jump / 2**20:.0f} MiB higher ({after_warmup['peak_allocated'] / 2**30:.2f}"
                     " GiB): the kernels' first-call tuning (an L2-sized flush buffer and the timing graphs, "
                     "inside the planner's 64 MiB allocator allowance); a budget sized to the steady state alone "
                     "can run out of memory on the first call")
    if proc is None:
        notes.append(f"per-process GPU memory unavailable ({why}): CUDA context and other processes are "
                     "shown together as device used - torch reserved")
    return out


# ----- host -----
def mapped_file_rss(files) -> int | None:
    """Resident bytes of this process's mappings of ``files`` (page-cache pages it has mapped), or None."""
    want = {os.path.realpath(f) for f in files}
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        if _SMAPS_HEADER.match(line):
            parts = line.split(None, 5)
            inside = len(parts) == 6 and parts[5].strip() in want
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def measure_host(engine) -> dict:
    w = engine.weights
    staged = sum(nbytes(b) for b in w.stream.host_bufs.values())
    ring = sum(nbytes(b) for b in w.stream.disk.bufs) if w.stream.disk is not None else 0
    files = sorted({str(i.file) for i in engine.ckpt.tensors.values()})
    vm = psutil.virtual_memory()
    return {"rss_bytes": psutil.Process().memory_info().rss, "pinned": engine.device.type == "cuda",
            "host_copies_bytes": staged, "disk_ring_bytes": ring, "pinned_bytes": staged + ring,
            "checkpoint_mapped_rss_bytes": mapped_file_rss(files), "checkpoint_files": len(files),
            "ram_total_bytes": vm.total, "ram_available_bytes": vm.available}


# ----- the traced decode run -----
def prompt_ids(engine, n: int) -> list[int]:
    vocab = engine.cfg.vocab_size
    try:
        ids = [i for i in engine.tokenizer.encode(PROMPT_TEXT * 4) if 0 <= i < vocab]
    except Exception:  # any tokenizer trouble: fall back to fixed ids, the timing does not care
        ids = []
    ids = ids or [1 + i % (vocab - 1) for i in range(n)]
    return (ids * (n // len(ids) + 1))[:n]


@contextmanager
def _trace_resident(weights, tracer):
    """Also time resident layers and a resident lm_head on the compute lane (the manager times streamed units)."""
    orig_layer, orig_release, orig_parts = weights.layer, weights.release, weights.lm_head_parts
    stream = weights.stream.sync.compute_stream

    def layer(i):
        if i in weights.resident:
            tracer.begin("compute", f"layer.{i}", stream())
        return orig_layer(i)

    def release(i):
        orig_release(i)
        if i in weights.resident:
            tracer.end("compute", f"layer.{i}", stream())

    def parts():
        if weights.lm_head is None:
            yield from orig_parts()
            return
        for row, t in orig_parts():
            tracer.begin("compute", "lm_head.0", stream())
            yield row, t
            tracer.end("compute", "lm_head.0", stream())

    weights.layer, weights.release, weights.lm_head_parts = layer, release, parts
    try:
        yield
    finally:
        del weights.layer, weights.release, weights.lm_head_parts


def traced_prefill(engine, ids: list[list[int]], tracer) -> tuple[torch.Tensor, list[dict]]:
    """The prompts' prefill, traced on its own: the copy pipeline restarts at unit 0 after ``mark()`` so
    every streamed unit's copy is in the trace, resident layers are timed too, and each prompt chunk's
    work inside a layer is a span on the "chunk" lane ("chunk.k", k-th chunk of the prompt).
    Returns (greedy next tokens, spans)."""
    chunk = max(1, engine.opts.prefill_chunk // len(ids))  # as engine.generate.prefill cuts the prompt
    n_chunks = -(-max(len(p) for p in ids) // chunk)
    ops, count, stream = engine.ops, itertools.count(), engine.weights.stream.sync.compute_stream
    plain = ops.prompt_chunk

    @contextmanager
    def chunk_span(rows: int):
        name = f"chunk.{next(count) % n_chunks}"
        tracer.begin("chunk", name, stream())
        with plain(rows):
            yield
        tracer.end("chunk", name, stream())

    tracer.mark()
    engine.weights.stream.reset()  # re-issue the first slots' copies (issued by the last pass) inside the trace
    ops.prompt_chunk = chunk_span
    try:
        with _trace_resident(engine.weights, tracer):
            tok = prefill(engine, ids).argmax(-1)
    finally:
        del ops.prompt_chunk
    return tok, tracer.timeline()


def _step(engine, tok: torch.Tensor, pos: int) -> tuple[torch.Tensor, float]:
    """One greedy decode step at position ``pos``; returns (next tokens, ms the host took to issue it)."""
    b, dev = engine.opts.batch, engine.device
    t0 = time.perf_counter()
    logits = engine.model.forward(tok.view(b, 1), torch.full((b,), pos, dtype=torch.int32, device=dev),
                                  torch.ones(b, dtype=torch.int32, device=dev), engine.cache, max_len=pos + 1)
    issued = (time.perf_counter() - t0) * 1e3
    tok = logits.argmax(-1)
    tok.tolist()  # the per-step host sync of generate()
    return tok, issued


def decode_run(engine, steps: int, prompt_tokens: int, observe: int = 4, on_warm=None) -> dict:
    """A warm-up pass (prefill and one decode step: kernel JIT and autotuning), ``on_warm()``, then a
    ``prompt_tokens`` prefill and ``steps`` greedy decode steps (one host sync each, like ``generate``).
    The last ``observe`` steps are timed, and on CUDA traced (the tracer is marked one step earlier so the
    copies feeding the first observed step are in the trace); on CUDA the prefill is traced too."""
    b, cap = engine.opts.batch, engine.opts.max_context
    n = min(prompt_tokens, cap - steps - 1)
    if steps < 2 or n < 1:
        raise ValueError(f"a {steps}-step run needs --steps >= 2 and a context above steps + 1 (it is {cap}): "
                         "raise --context or change --steps")
    observe = min(observe, steps - 1)
    lead = steps - observe - 1
    tracer = engine.weights.stream.tracer  # None on the CPU (CUDA events)
    ids = [prompt_ids(engine, n)] * b
    engine.cache.reset()
    t0 = time.perf_counter()
    _step(engine, prefill(engine, ids).argmax(-1), n)
    first_ms = (time.perf_counter() - t0) * 1e3
    if on_warm is not None:
        on_warm()
    engine.cache.reset()
    tok, prefill_spans = traced_prefill(engine, ids, tracer) if tracer else (prefill(engine, ids).argmax(-1), [])
    events, host, issued = [], [], []
    with _trace_resident(engine.weights, tracer) if tracer else contextlib.nullcontext():
        for s in range(steps + 1):
            if s > lead:
                host.append(time.perf_counter())
                if tracer:
                    events.append(torch.cuda.Event(enable_timing=True))
                    events[-1].record()
            if s == steps:
                break
            if tracer and s == lead:
                tracer.mark()
            tok, ms = _step(engine, tok, n + s)
            if s > lead:
                issued.append(ms)
    spans = tracer.timeline() if tracer else []
    return {"prompt_tokens": n, "steps": steps, "observed": observe, "warmup_ms": first_ms,
            "host_step_ms": [(t1 - t0) * 1e3 for t0, t1 in zip(host, host[1:])], "issue_ms": issued,
            "spans": spans, "prefill_spans": prefill_spans,
            "bounds_ms": [tracer.origin.elapsed_time(e) for e in events] if tracer else [],
            "graph_step_ms": _graph_steps(engine, ids, steps)}


def _graph_steps(engine, ids: list[list[int]], steps: int) -> list[float]:
    """Host-timed decode steps the way ``generate`` runs them (CUDA-graph replay when the engine
    captured one); [] when it did not. The traced steps above run eagerly, layer by layer."""
    if engine.graph is None:
        return []
    b, n = engine.opts.batch, len(ids[0])
    engine.cache.reset()
    tok = prefill(engine, ids).argmax(-1)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        tok = decode_step(engine, tok, [n + s] * b).argmax(-1)
        tok.tolist()  # the per-step host sync of generate()
        times.append((time.perf_counter() - t0) * 1e3)
    return times[1:]  # the first step also waits for the prefill's tail
