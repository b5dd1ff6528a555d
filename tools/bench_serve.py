"""Load benchmark of the OpenAI-compatible server: concurrent streaming clients, latency and throughput.

    python tools/bench_serve.py --url http://127.0.0.1:8000 --clients 1,4,16,32 \\
        --prompt-tokens 128:2048 --max-tokens 128:256 --requests-per-client 2 --json out.json

Each client sends its requests one after another to /v1/completions with random token-id prompts
(exact lengths; ``ignore_eos`` so every request generates its drawn number of tokens) and reads the
stream. Per concurrency level: aggregate generated tok/s, time to first token (TTFT) p50/p99, the
gap between streamed chunks (inter-token latency, ITL) p50/p99, and the server's streamed-weight
GB/s (from /metrics). ``--serve "FLAGS"`` starts ``python -m engine.serve FLAGS`` on a free port first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]


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
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    chunks, usage = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        if event["choices"] and event["choices"][0]["text"]:
            chunks.append(time.perf_counter())
    conn.close()
    return {"t0": t0, "chunks": chunks, "tokens": usage["completion_tokens"] if usage else 0}


def run_level(url: str, model: str, clients: int, per_client: int, prompt_range: tuple[int, int],
              new_range: tuple[int, int], vocab: int, seed: int, shared: int = 0) -> dict:
    """``clients`` threads, each sending ``per_client`` requests in turn; the level's summary.
    Every prompt starts with the same ``shared`` tokens (a system prompt) before its own."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(shared)]
    jobs = [[(prefix + [rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*new_range))
             for _ in range(per_client)] for _ in range(clients)]
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(my_jobs) -> None:
        for prompt, n in my_jobs:
            try:
                r = one_request(url, model, prompt, n)
            except Exception as e:  # noqa: BLE001 - counted and reported, the level goes on
                with lock:
                    errors.append(str(e))
                continue
            r["wanted"] = n
            with lock:
                results.append(r)

    streamed0 = metric(url, "layerstream_streamed_bytes_total")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    streamed = metric(url, "layerstream_streamed_bytes_total") - streamed0
    ttft = [r["chunks"][0] - r["t0"] for r in results if r["chunks"]]
    itl = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "tokens": tokens, "complete": sum(r["tokens"] == r["wanted"] for r in results),
            "tok_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "itl_mean_s": statistics.fmean(itl) if itl else 0.0, "streamed_gb_s": streamed / wall / 1e9,
            "first_error": errors[0] if errors else None}


def start_server(flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port", str(port), *flags.split()],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} (run it by hand to see why)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise ValueError(f"bad range {text!r}: use N or LO:HI with 1 <= LO <= HI")
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (else --serve)")
    p.add_argument("--serve", help="start `python -m engine.serve` with these flags (quoted)")
    p.add_argument("--clients", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", default="128:2048", help="N or LO:HI (uniform)")
    p.add_argument("--max-tokens", default="128:256", help="N or LO:HI (uniform)")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens every prompt starts with (a shared system prompt), before its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the levels here as a JSON list")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",")]
        prompt_range, new_range = parse_range(args.prompt_tokens), parse_range(args.max_tokens)
        if (args.url is None) == (args.serve is None) or min(levels) < 1 or args.requests_per_client < 1 \
                or args.shared_prefix < 0:
            raise ValueError("give exactly one of --url and --serve, clients >= 1, --requests-per-client >= 1, "
                             "--shared-prefix >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    proc, url = start_server(args.serve) if args.serve else (None, args.url.rstrip("/"))
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            card = json.loads(r.read())["data"][0]
        vocab = 1000  # ids below every tokenizer's size
        rows = []
        for i, clients in enumerate(levels):
            row = run_level(url, card["id"], clients, args.requests_per_client, prompt_range, new_range, vocab,
                            args.seed + i, args.shared_prefix)
            rows.append(row)
            print(f"{clients:3d} clients: {row['tok_s']:8.1f} tok/s | TTFT p50 {row['ttft_p50_s']*1e3:7.1f} ms "
                  f"p99 {row['ttft_p99_s']*1e3:7.1f} ms | ITL p50 {row['itl_p50_s']*1e3:6.1f} ms "
                  f"p99 {row['itl_p99_s']*1e3:6.1f} ms | {row['streamed_gb_s']:.2f} GB/s streamed | "
                  f"{row['complete']}/{row['requests']} complete, {row['errors']} errors", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0 if all(r["errors"] == 0 and r["complete"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
