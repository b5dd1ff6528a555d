"""Load benchmark of the OpenAI-compatible server: concurrent streaming clients, latency and throughput.

    python -m tools.bench_serve --url http://127.0.0.1:8000 --clients 1,4,16,32 \\
        --prompt-tokens 128:2048 --max-tokens 128:256 --requests-per-client 2 --json out.json
    python -m tools.bench_serve --serve "--model M --vram-budget 6GiB" --all-resident --peer-accelerate 6GiB

Each client sends its requests one after another to /v1/completions with random token-id prompts
(exact lengths; ``ignore_eos`` so every request generates its drawn number of tokens) and reads the
stream. Per concurrency level: aggregate generated tok/s, time to first token (TTFT) p50/p99, the
gap between streamed chunks (inter-token latency, ITL) p50/p99, and the server's streamed-weight
GB/s (from /metrics). ``--serve "FLAGS"`` starts ``python -m engine.serve FLAGS`` on a free port first.
Before the first level, each server gets one short warm-up request, which no row counts (the output says
so): a first request's one-off costs, whatever the server's own warm-up left, stay out of the levels.

In the same run, ``--all-resident`` repeats the levels on a server started without the flags'
``--vram-budget`` (every layer resident), and ``--peer-accelerate BUDGET`` serves the 1-client level's
requests one by one with transformers + accelerate offload at that budget (``tools.bench_serve_peer``,
bounded by ``--peer-time-limit``). Rows are labelled ``config``: server, resident or peer.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlparse

from memory.units import parse_size_arg
from tools.serve_process import start_server

VOCAB = 1000  # prompt ids below every tokenizer's size
WARMUP_PROMPT, WARMUP_TOKENS = list(range(1, 9)), 4  # the uncounted request before the first level


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def one_request(url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; timestamps of the send, each chunk with text, and the usage."""
    u = urlparse(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=600)
    # greedy and no penalty, whatever the model's own settings (engine.generation_defaults): the same work a
    # step as the runs before those defaults
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "repetition_penalty": 1.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.monotonic()  # the clock of the server's --step-log "mono_s" (same host): tools/ttft_breakdown.py
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    chunks, usage, finish = [], None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        if event["choices"] and event["choices"][0]["text"]:
            chunks.append(time.monotonic())
        if event["choices"] and event["choices"][0].get("finish_reason"):
            finish = event["choices"][0]["finish_reason"]
    conn.close()
    if finish not in ("stop", "length"):  # "abort": the server gave up on it (its log says why)
        raise RuntimeError(f"the stream ended with finish_reason {finish!r} after {len(chunks)} chunks")
    return {"t0": t0, "chunks": chunks, "tokens": usage["completion_tokens"] if usage else 0,
            "prompt_tokens": len(prompt)}


def make_jobs(clients: int, per_client: int, prompt_range: tuple[int, int], new_range: tuple[int, int],
              vocab: int, seed: int, shared: int = 0) -> list[list[tuple[list[int], int]]]:
    """Each client's (prompt ids, new tokens) in turn; every prompt starts with the same ``shared``
    tokens (a system prompt) before its own."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(shared)]
    return [[(prefix + [rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*new_range))
             for _ in range(per_client)] for _ in range(clients)]


def summarize(results: list[dict], errors: list[str], wall: float, streamed: float | None) -> dict:
    """A level's row from its requests' timestamps (``t0``, ``chunks``, ``tokens``, ``wanted``):
    aggregate tok/s over ``wall``, TTFT and inter-token latency percentiles, streamed GB/s (None: not
    measured)."""
    ttft = [r["chunks"][0] - r["t0"] for r in results if r["chunks"]]
    itl = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "errors": len(errors), "wall_s": wall,
            "tokens": tokens, "complete": sum(r["tokens"] == r["wanted"] for r in results),
            "tok_s": tokens / wall if wall > 0 else 0.0, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "itl_mean_s": statistics.fmean(itl) if itl else 0.0,
            "streamed_gb_s": None if streamed is None else streamed / wall / 1e9,
            "first_error": errors[0] if errors else None,
            "per_request": [{"sent_s": r["t0"], "first_s": r["chunks"][0] if r["chunks"] else None,
                             "prompt_tokens": r.get("prompt_tokens"), "tokens": r["tokens"],
                             "client": r.get("client", 0)} for r in results]}


def scaling(row: dict, one: dict) -> tuple[float, float] | None:
    """A level's aggregate tok/s as a multiple of the one-client level's, and the most it could be: every
    token at the one-client level's mean inter-token latency, nothing else (no prefill, no wait), the level
    done when its busiest client is (with 128-256 new tokens a request, 16 clients x 1 request top out near
    12.7x: session 27). None without tokens on either side."""
    per_client: dict[int, int] = {}
    for r in row["per_request"]:
        per_client[r["client"]] = per_client.get(r["client"], 0) + r["tokens"]
    if not one["tok_s"] or not row["tokens"] or not one["itl_mean_s"]:
        return None
    ceiling = row["tokens"] / (max(per_client.values()) * one["itl_mean_s"])
    return row["tok_s"] / one["tok_s"], ceiling / one["tok_s"]


def run_level(url: str, model: str, jobs: list[list[tuple[list[int], int]]]) -> dict:
    """One client thread per entry of ``jobs``, each sending its requests in turn; the level's summary."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int, my_jobs) -> None:
        for prompt, n in my_jobs:
            try:
                r = one_request(url, model, prompt, n)
            except Exception as e:  # noqa: BLE001 - counted and reported, the level goes on
                with lock:
                    errors.append(str(e))
                continue
            r["wanted"], r["client"] = n, c
            with lock:
                results.append(r)

    streamed0 = metric(url, "layerstream_streamed_bytes_total")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c, j)) for c, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    streamed = metric(url, "layerstream_streamed_bytes_total") - streamed0
    return {"clients": len(jobs), **summarize(results, errors, wall, streamed)}


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise ValueError(f"bad range {text!r}: use N or LO:HI with 1 <= LO <= HI")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (else --serve)")
    p.add_argument("--serve", help="start `python -m engine.serve` with these flags (quoted)")
    p.add_argument("--clients", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", default="128:2048", help="N or LO:HI (uniform)")
    p.add_argument("--max-tokens", default="128:256", help="N or LO:HI (uniform)")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens every prompt starts with (a shared system prompt), before its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-resident", action="store_true",
                   help="with --serve: run the levels again on a server started without its --vram-budget")
    p.add_argument("--peer-accelerate", metavar="BUDGET",
                   help="then serve the 1-client level's requests one by one with transformers + accelerate "
                        "offload at this GPU budget (e.g. 6GiB); a server started by --serve is stopped first")
    p.add_argument("--peer-model", help="the model directory the peer loads (default: --model in --serve)")
    p.add_argument("--peer-time-limit", type=float, default=600.0, metavar="SECONDS",
                   help="the peer stops by itself after this long (default 600), mid-request if need be")
    p.add_argument("--json", help="write the rows here as a JSON list")
    p.add_argument("--server-log", help="append the started servers' stderr to this file (else discarded)")
    return p


def _flag(flags: list[str], name: str) -> tuple[str | None, list[str]]:
    """(the value of ``name`` in ``flags`` or None, the flags without it)."""
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            return flags[i + 1], flags[:i] + flags[i + 2:]
        if f.startswith(name + "="):
            return f.split("=", 1)[1], flags[:i] + flags[i + 1:]
    return None, flags


def check_args(args) -> None:
    """ValueError naming what is wrong with the flags; fills in ``levels``, the ranges and the peer's."""
    args.levels = [int(c) for c in args.clients.split(",")]
    args.prompt_range, args.new_range = parse_range(args.prompt_tokens), parse_range(args.max_tokens)
    if (args.url is None) == (args.serve is None) or min(args.levels) < 1 or args.requests_per_client < 1 \
            or args.shared_prefix < 0:
        raise ValueError("give exactly one of --url and --serve, clients >= 1, --requests-per-client >= 1, "
                         "--shared-prefix >= 0")
    serve_flags = shlex.split(args.serve or "")
    if args.all_resident and _flag(serve_flags, "--vram-budget")[0] is None:
        raise ValueError("--all-resident reruns the --serve flags without their --vram-budget: give --serve "
                         "with a --vram-budget")
    args.peer_budget = None
    if args.peer_accelerate is not None:
        args.peer_budget = parse_size_arg(args.peer_accelerate, "--peer-accelerate")
        args.peer_model = args.peer_model or _flag(serve_flags, "--model")[0]
        if args.peer_model is None or not Path(args.peer_model).is_dir():
            raise ValueError(f"--peer-accelerate needs the model directory (--peer-model, or --model in --serve); "
                             f"got {args.peer_model!r}")
        if args.peer_time_limit <= 0:
            raise ValueError("--peer-time-limit must be positive seconds")


def _print_row(row: dict) -> None:
    label = "peer (one by one)" if row["config"] == "peer" else f"{row['config']}, {row['clients']:2d} clients"
    gbs = "-" if row["streamed_gb_s"] is None else f"{row['streamed_gb_s']:.2f}"
    print(f"{label:>20}: {row['tok_s']:8.1f} tok/s | TTFT p50 {row['ttft_p50_s']*1e3:7.1f} ms "
          f"p99 {row['ttft_p99_s']*1e3:7.1f} ms | ITL p50 {row['itl_p50_s']*1e3:6.1f} ms "
          f"p99 {row['itl_p99_s']*1e3:6.1f} ms | {gbs} GB/s streamed | "
          f"{row['complete']}/{row.get('requests_total', row['requests'])} complete, {row['tokens']} tokens, "
          f"{row['errors']} errors", flush=True)


def server_rows(args, config: str, flags: str | None) -> list[dict]:
    """Every concurrency level against ``--url``, or against a server started with ``flags``."""
    proc, url = start_server(shlex.split(flags), log=args.server_log) if flags else (None, args.url.rstrip("/"))
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            card = json.loads(r.read())["data"][0]
        warm = one_request(url, card["id"], WARMUP_PROMPT, WARMUP_TOKENS)
        first = f"{(warm['chunks'][0] - warm['t0']) * 1e3:.1f} ms" if warm["chunks"] else "none"
        print(f"{config}: one warm-up request first, not counted ({len(WARMUP_PROMPT)} prompt tokens, "
              f"{warm['tokens']} generated, first token {first})", flush=True)
        rows = []
        for i, clients in enumerate(args.levels):
            jobs = make_jobs(clients, args.requests_per_client, args.prompt_range, args.new_range, VOCAB,
                             args.seed + i, args.shared_prefix)
            rows.append({"config": config, **run_level(url, card["id"], jobs)})
            _print_row(rows[-1])
        one = next((r for r in rows if r["clients"] == 1), None)
        for row in rows if one is not None else []:
            if row["clients"] > 1 and (sc := scaling(row, one)) is not None:
                row["vs_one"], row["ceiling_vs_one"] = sc
                print(f"{config}, {row['clients']:2d} clients: {sc[0]:.2f}x one client's tok/s; ceiling {sc[1]:.2f}x "
                      f"(every token at one client's mean ITL, the busiest client last): {sc[0] / sc[1]:.0%} of it",
                      flush=True)
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


def _write(path: str | None, rows: list[dict]) -> None:
    """The rows so far as a JSON list at ``path`` (atomically), when a path is given."""
    if path:
        from tools.report_render import atomic_write

        atomic_write(Path(path), json.dumps(rows, indent=1).encode())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = server_rows(args, "server", args.serve)
    _write(args.json, rows)  # after each part: a run cut short (a time box, the slow peer) keeps what it measured
    if args.all_resident:
        rows += server_rows(args, "resident", shlex.join(_flag(shlex.split(args.serve), "--vram-budget")[1]))
        _write(args.json, rows)
    if args.peer_budget is not None:
        from tools.bench_serve_peer import run_peer  # torch and transformers: only for the peer

        i = args.levels.index(1) if 1 in args.levels else 0
        jobs = make_jobs(1, args.requests_per_client, args.prompt_range, args.new_range, VOCAB, args.seed + i,
                         args.shared_prefix)[0]
        rows.append(run_peer(args.peer_model, args.peer_budget, jobs, args.peer_time_limit))
        _print_row(rows[-1])
        _write(args.json, rows)
    served = [r for r in rows if r["config"] != "peer"]  # the peer's time limit may leave requests undone
    return 0 if all(r["errors"] == 0 and r["complete"] == r["requests"] for r in served) else 1


if __name__ == "__main__":
    sys.exit(main())
