"""A burst of requests in process, no HTTP: each pass until every prompt has its first token, timed.

    python bench/burst_probe.py --model DIR [--clients 16 --seed 2 --rounds 2] [--out burst.json] [--profile] [--cprofile]

The prompts are those of ``tools.bench_serve``'s level (``make_jobs(clients, 1, 128:2048, ...)`` with the
level's seed: 2 for the third level, 16 clients), each round with a fresh first token so nothing is
reused. The scheduler is warmed up as ``engine.serve`` does; each round adds every prompt at once and
steps (synchronized) until all have their first token. On the H200 at 6 GiB the served 16-client burst's
first pass (9,453 tokens) took 931 ms and its second (9,463 tokens) 724 ms (session 19, call 2); here, on
the next machine, with the passes sized by the median rule: 6,647 tokens in 386 ms (9 first tokens), then
12,268 in 575 ms (call 4). Host-bound passes differ from machine to machine, so ``session_run.sh bs`` runs
this and the served level on one. ``--profile``: one more round whose first pass runs under torch's
profiler, its GPU kernels summed by kind and by name (tools.profile_decode's table): where a pass's time goes
(the synthetic 7B AWQ's served passes cost ~95 us a prompt token on the H200 against ~59 for the bf16 7B's,
session 21). ``--cprofile``: one more round whose first pass runs under cProfile (the engine thread's
Python functions by own and cumulative time: where a host-bound pass's thread goes).
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.pass_gaps import gaps, load  # noqa: E402
from bench.pass_gaps import report as gap_report  # noqa: E402
from bench.probe_server import server_parser, sync  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.serving.sequence import Sequence  # noqa: E402
from engine.serving.warmup import warm_up  # noqa: E402
from tools.bench_serve import VOCAB, make_jobs  # noqa: E402
from tools.profile_decode import kernel_rows, report  # noqa: E402


class GcClock:
    """Python's cyclic garbage collections while installed: their count and time (a full one walks every
    object the process holds: 147 ms for the tiny model's ~190K on the CPU machine)."""

    def __init__(self) -> None:
        import gc
        self.ms, self.count, self.full, self._t = 0.0, 0, 0, 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._t) * 1e3
            self.count += 1
            self.full += info["generation"] == 2

    def take(self) -> tuple[float, int, int]:
        out = (self.ms, self.count, self.full)
        self.ms, self.count, self.full = 0.0, 0, 0
        return out


GC = GcClock()


def burst(llm: LLM, prompts: list[list[int]]) -> list[dict]:
    """Every prompt added at once; the passes (time, batch, tokens, Python's collections during it)
    until each has a first token."""
    sched, params = llm.scheduler, SamplingParams(max_tokens=2, temperature=0.0)
    seqs = [Sequence(p, params, llm.tokenizer) for p in prompts]
    for s in seqs:
        sched.add(s)
    passes, queued = [], QueuedClock(llm)
    while any(not s.output_ids for s in seqs):
        sync()
        GC.take()
        t = queued.t = time.perf_counter()
        sched.step()
        sync()
        st, (gc_ms, gcs, full) = sched.stats, GC.take()
        passes.append({"ms": (time.perf_counter() - t) * 1e3, "cpu_ms": st.last_cpu_s * 1e3, "batch": st.last_batch,
                       "queued_ms": queued.ms,
                       "tokens": st.last_tokens, "gc_ms": gc_ms, "gcs": gcs, "full_gcs": full,
                       "first_tokens": sum(1 for s in seqs if s.output_ids)})
    queued.close()
    while sched.has_work():
        sched.step()
    return passes


class QueuedClock:
    """When a pass was queued on the device (the runner's ``on_queued``), in ms after ``t``: near the pass's
    wall time, the host queued the pass as the GPU ran it (host-bound, or a full launch queue); well below, the
    GPU ran behind the host."""

    def __init__(self, llm: LLM) -> None:
        self.runner, self.t, self.ms = llm.scheduler.runner, 0.0, float("nan")
        self.inner = self.runner.on_queued
        self.runner.on_queued = self._hook

    def _hook(self) -> None:
        self.ms = (time.perf_counter() - self.t) * 1e3
        if self.inner is not None:
            self.inner()

    def close(self) -> None:
        self.runner.on_queued = self.inner


def first_pass_under(llm: LLM, prompts: list[list[int]], wrap) -> tuple[float, int, int]:
    """Every prompt added at once, the first pass run (synchronized) inside the context manager ``wrap``, the
    rest of the burst after it, outside; returns that pass's (wall ms, batch, tokens)."""
    sched, params = llm.scheduler, SamplingParams(max_tokens=2, temperature=0.0)
    for p in prompts:
        sched.add(Sequence(p, params, llm.tokenizer))
    sync()
    with wrap:
        t = time.perf_counter()
        sched.step()
        sync()
        wall = time.perf_counter() - t
    batch, tokens = sched.stats.last_batch, sched.stats.last_tokens
    while sched.has_work():
        sched.step()
    return wall * 1e3, batch, tokens


def profiled_pass(llm: LLM, prompts: list[list[int]]) -> dict:
    """The burst's first pass under torch's profiler: tools.profile_decode's result shape (one "step": the
    pass, tools.profile_decode.kernel_rows)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []))
    ms, batch, tokens = first_pass_under(llm, prompts, prof)
    return {"step_ms": ms, "rows": kernel_rows(prof, gpu, 1), "gpu": gpu, "steps": 1, "batch": batch,
            "tokens": tokens, "host_calls": host_calls(prof)}


def traced_pass(llm: LLM, prompts: list[list[int]], path: str) -> dict:
    """The burst's first pass traced as ``traced_steps`` does."""
    return traced_steps(lambda: first_pass_under(llm, prompts, contextlib.nullcontext()), path)


def traced_steps(run, path: str) -> dict:
    """``run()`` (returning its pass's (wall ms, batch, tokens), or a dict of them) under torch's profiler with
    CUDA activity only (the least host overhead), its chrome trace gzipped into ``path`` and its compute stream's
    idle gaps by cause (bench/pass_gaps.py), printed and returned."""
    import gzip
    import os
    import shutil
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU])
    with prof:
        got = run()
    ms, batch, tokens = (got["ms"], got["batch"], got["tokens"]) if isinstance(got, dict) else got
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as f, gzip.open(path, "wb") as g:
            shutil.copyfileobj(f, g)
    res = gaps(load(path))
    res.update(pass_ms=round(ms, 1), batch=batch, tokens=tokens)
    print(f"traced pass: {res['pass_ms']} ms, batch {batch}, tokens {tokens}", flush=True)
    print("\n".join(gap_report(res)), flush=True)
    return res


def cprofiled_pass(llm: LLM, prompts: list[list[int]], top: int = 40) -> list[str]:
    """The burst's first pass under cProfile, as ``cprofiled`` reports it."""
    return cprofiled(lambda: first_pass_under(llm, prompts, contextlib.nullcontext()), top)


def cprofiled(run, top: int = 40) -> list[str]:
    """``run()`` (a pass: its (wall ms, batch, tokens), or a dict of them) under cProfile (the engine thread's
    Python, which bounds a host-bound pass): its functions by own time and by cumulative time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    with prof:
        got = run()
    ms, batch, tokens = (got["ms"], got["batch"], got["tokens"]) if isinstance(got, dict) else got
    lines = [f"cProfiled pass: {ms:.1f} ms, batch {batch}, tokens {tokens}"]
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        lines += [ln for ln in buf.getvalue().splitlines() if ln.strip()][3:]
    return lines


def host_calls(prof, top: int = 12) -> list[dict]:
    """The host's CUDA runtime calls over a profile, by total time: where a host-bound pass's thread went
    (launches, pinned allocations, synchronisations, copies from pageable memory)."""
    rows = [{"name": e.key, "calls": e.count, "ms": e.cpu_time_total / 1e3} for e in prof.key_averages()
            if e.key.startswith("cuda")]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def oom_report(llm: LLM, top: int = 25) -> list[str]:
    """After an out-of-memory error: the plan, the allocator's counters and the live CUDA tensors by shape."""
    import gc
    from collections import Counter
    size, count = Counter(), Counter()
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda:
                k = (tuple(o.shape), str(o.dtype).replace("torch.", ""))
                size[k] += o.untyped_storage().nbytes()
                count[k] += 1
        except Exception:  # noqa: BLE001  (objects gc hands back can be half-built)
            continue
    st = torch.cuda.memory_stats()
    lines = llm.engine.plan.summary_lines() + [
        f"allocated {st['allocated_bytes.all.current'] / 2**20:.0f} MiB, peak {st['allocated_bytes.all.peak'] / 2**20:.0f}"
        f" MiB, reserved {st['reserved_bytes.all.current'] / 2**20:.0f} MiB; live CUDA tensors "
        f"{sum(size.values()) / 2**20:.0f} MiB by shape:"]
    lines += [f"  {k[0]} {k[1]}: {count[k]} x, {v / 2**20:.1f} MiB" for k, v in size.most_common(top)]
    return lines


def _fresh(llm: LLM, jobs: list, r: int) -> list[list[int]]:
    """Round ``r``'s prompts: the level's, each with a first token of its own (nothing reused)."""
    return [[(VOCAB + 7 * r + i) % llm.engine.cfg.vocab_size] + ids[1:] for i, (ids, _) in enumerate(jobs)]


def main() -> None:
    p = server_parser(__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--profile", action="store_true", help="one more round, its first pass profiled")
    p.add_argument("--cprofile", action="store_true", help="one more round, its first pass under cProfile")
    p.add_argument("--trace", help="one more round, its first pass traced (CUDA activity only), the chrome trace "
                   "written here (.json.gz) and its compute stream's gaps by cause (bench/pass_gaps.py)")
    a = p.parse_args()
    llm = LLM(a.model, vram_budget=a.vram_budget, max_batch=a.max_batch, max_context=a.max_context)
    plan = llm.engine.plan
    print(f"plan: {len(plan.resident_layers)} layers resident, {len(plan.streamed_layers)} streamed, dense tile "
          f"{plan.scratch_bytes >> 20} MiB, KV {plan.kv_cache_bytes >> 20} MiB", flush=True)
    t = time.perf_counter()
    print(f"{warm_up(llm.scheduler).summary()} ({time.perf_counter() - t:.1f} s)", flush=True)
    jobs = [job for client in make_jobs(a.clients, 1, (128, 2048), (2, 2), VOCAB, a.seed) for job in client]
    print("prompt tokens:", sorted(len(ids) for ids, _ in jobs))
    rounds = []
    for r in range(a.rounds):
        prompts = _fresh(llm, jobs, r)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            rounds.append(burst(llm, prompts))
        except torch.OutOfMemoryError:
            print("\n".join(oom_report(llm)), flush=True)
            raise
        for x in rounds[-1]:
            print(f"round {r + 1}: {x['ms']:7.1f} ms (queued after {x['queued_ms']:7.1f}, engine thread CPU {x['cpu_ms']:7.1f})  batch {x['batch']:3d}  tokens {x['tokens']:6d}  "
                  f"first tokens so far {x['first_tokens']}  GC {x['gc_ms']:5.1f} ms ({x['gcs']}, {x['full_gcs']} full)",
                  flush=True)
        if torch.cuda.is_available():
            print(f"round {r + 1}: peak {torch.cuda.max_memory_allocated() >> 20} MiB allocated", flush=True)
    from kernels import fastlaunch
    print(f"fastlaunch: {fastlaunch.STATS['direct']} launches direct, {fastlaunch.STATS['triton']} through Triton "
          f"(LAYERSTREAM_FAST_LAUNCH={'on' if fastlaunch._ENABLED else 'off'})", flush=True)
    out = {"rounds": rounds}
    if a.profile:
        prompts = _fresh(llm, jobs, a.rounds)
        res = out["profiled_pass"] = profiled_pass(llm, prompts)
        print(f"profiled pass: {res['tokens']} tokens, batch {res['batch']}", flush=True)
        print("\n".join(report(res, top=30)), flush=True)
        print(f"{'host CUDA call':40} {'calls':>7} {'ms':>9}", flush=True)
        for r in res["host_calls"]:
            print(f"{r['name'][:40]:40} {r['calls']:7d} {r['ms']:9.2f}", flush=True)
    if a.trace:
        out["gaps"] = traced_pass(llm, _fresh(llm, jobs, a.rounds + 2), a.trace)
    if a.cprofile:
        out["cprofile"] = cprofiled_pass(llm, _fresh(llm, jobs, a.rounds + 1))
        print("\n".join(out["cprofile"]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out if a.profile or a.cprofile else rounds, indent=1))


if __name__ == "__main__":
    main()
