"""Served decode steps in process, no HTTP: each step's wall time at 1 and 16 running sequences, then a few
steps under torch's profiler, and where the copy engine idled in them.

    python bench/decode_step_probe.py --model DIR [--clients 1,16 --steps 40 --profile-steps 6] [--out DIR]

Why: the synthetic 7B AWQ served at 6 GiB steps in 76.1 ms at batch 1, but at batch 16 most steps take
79.7 ms and the rest 76.1 (session 23, the server's step log): a fixed ~3.6 ms, present with the GIL switch
interval at 5 ms and at 1 ms. The same batch-32 graph runs in both, so the question is what the host or
the copy engine does differently. The prompts are ``tools.bench_serve``'s (128-2048 tokens, the level's
seed); each sequence is prefilled, then the timed steps are pure decode steps of every sequence.
Per profiled level: the chrome trace (gzip), the overlap summary (bench/trace_overlap.py), and the
host-to-device idle gaps over 200 us with the host calls that ran during each (a host sync, a pageable copy,
a launch). Session 23, call 3 (bench/results/2026-12-03-h200-s23/): median 76.47 ms at 1 sequence and 76.39
ms at 16, the copy engine busy 99%, one ~0.3 ms gap a step while the host prepared the step's inputs: the
server's extra time came from its event loop (the scheduler now holds a step's outputs until the next
pass is queued).
"""
from __future__ import annotations

import gzip
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.probe_server import server_parser, sync  # noqa: E402
from bench.trace_overlap import _union, overlap  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.serving.sequence import Sequence  # noqa: E402
from engine.serving.warmup import warm_up  # noqa: E402
from tools.bench_serve import VOCAB, make_jobs  # noqa: E402


def start(llm: LLM, clients: int, seed: int, new_tokens: int) -> list[Sequence]:
    """``clients`` sequences (the level's prompts), stepped until every one is decoding."""
    jobs = [job for c in make_jobs(clients, 1, (128, 2048), (2, 2), VOCAB, seed) for job in c]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(ids, params, llm.tokenizer) for ids, _ in jobs]
    for s in seqs:
        llm.scheduler.add(s)
    while any(not s.output_ids for s in seqs):
        llm.scheduler.step()
    return seqs


def timed_steps(llm: LLM, n: int) -> list[float]:
    """``n`` decode steps back to back (as the server's loop runs them), each one's wall ms."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        llm.scheduler.step()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def h2d_gaps(trace: dict, over_us: float = 200.0) -> list[dict]:
    """The copy engine's idle gaps (no host-to-device copy) over ``over_us`` inside the profiled window,
    each with the host's CUDA runtime calls that overlapped it (name: count, total us)."""
    ev = trace.get("traceEvents", [])
    h2d = _union([(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") == "gpu_memcpy" and "HtoD" in
                  e.get("name", "") and "dur" in e])
    steps = sorted(e["ts"] for e in ev if e.get("name") == "decode_step" and e.get("cat") == "user_annotation")
    host = [e for e in ev if e.get("cat") == "cuda_runtime" and "dur" in e]
    gaps = []
    for (_, a), (b, _) in zip(h2d, h2d[1:]):
        if b - a < over_us:
            continue
        calls: dict[str, list] = {}
        for e in host:
            if e["ts"] < b and e["ts"] + e["dur"] > a:
                c = calls.setdefault(e["name"], [0, 0.0])
                c[0] += 1
                c[1] += min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
        step = sum(1 for t in steps if t <= a) - 1
        gaps.append({"step": step, "at_us": round(a - steps[step], 1) if step >= 0 else None, "us": round(b - a, 1),
                     "host_calls": {k: [v[0], round(v[1], 1)] for k, v in sorted(calls.items(), key=lambda x: -x[1][1])}})
    return gaps


def profiled_steps(llm: LLM, n: int, trace_path: Path) -> dict:
    """``n`` decode steps under torch's profiler (CPU and CUDA), each inside a ``decode_step`` range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sync()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            t = time.perf_counter()
            with record_function("decode_step"):
                llm.scheduler.step()
            walls.append((time.perf_counter() - t) * 1e3)
        sync()
    raw = trace_path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with gzip.open(trace_path, "wt") as f:
        json.dump(trace, f)
    raw.unlink()
    return {"walls_ms": [round(w, 2) for w in walls], "overlap": overlap(trace), "h2d_gaps": h2d_gaps(trace)}


def main() -> None:
    p = server_parser(__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,16")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("."))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(a.model, vram_budget=a.vram_budget, max_batch=a.max_batch, max_context=a.max_context)
    t = time.perf_counter()
    print(f"{warm_up(llm.scheduler).summary()} ({time.perf_counter() - t:.1f} s)", flush=True)
    res = {}
    for clients in (int(c) for c in a.clients.split(",")):
        seqs = start(llm, clients, a.seed, a.steps + a.profile_steps + 8)
        assert len(llm.scheduler.running) == clients, "every sequence decodes through the timed steps"
        walls = timed_steps(llm, a.steps)
        prof = profiled_steps(llm, a.profile_steps, a.out / f"decode_trace_b{clients}.json.gz")
        res[clients] = {"steps_ms": [round(w, 2) for w in walls], "median_ms": round(statistics.median(walls), 2),
                        "min_ms": round(min(walls), 2), **prof}
        print(f"batch {clients}: median {res[clients]['median_ms']} ms, min {res[clients]['min_ms']} ms; steps "
              f"{' '.join(f'{w:.1f}' for w in walls)}", flush=True)
        print(f"  profiled {prof['walls_ms']}; overlap {json.dumps(prof['overlap'])}", flush=True)
        for g in prof["h2d_gaps"]:
            print(f"  H2D idle {g['us']:8.1f} us at step {g['step']} +{g['at_us']} us: {g['host_calls']}", flush=True)
        for s in seqs:
            llm.scheduler.abort(s.seq_id)
    (a.out / "decode_steps.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
