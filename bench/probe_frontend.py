"""Issue 16's front end: a request's send to its arrival at the engine (the step log's ``arrived_s``), 20 lone requests
(1,857 prompt ids, one token) and three bursts of 16 (128-2,048 ids), against a running server started with
``--step-log LOG`` on 127.0.0.1.

    python bench/probe_frontend.py PORT LOG
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
from http.client import HTTPConnection


def send(port: int, prompt: list[int], sent: list[float]) -> None:
    """One streamed completion of one token; its send time (``time.monotonic()``) appended to ``sent``."""
    conn = HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": None, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    conn.getresponse().read()
    conn.close()
    sent.append(t0)


def steps(log: str) -> list[dict]:
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def burst_once(port: int, log: str, rng: random.Random, longest: int) -> tuple[list[float], list[dict]]:
    """16 requests (128-``longest`` random ids) sent at once from 16 threads: their send times and the step log's
    new lines once all are answered."""
    n0, sent = len(steps(log)), []
    threads = [threading.Thread(target=send, args=(port, [rng.randrange(1000) for _ in range(rng.randint(128, longest))],
                                                   sent)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.3)
    return sent, steps(log)[n0:]


def main(port: int, log: str) -> None:
    rng = random.Random(0)
    alone = []
    for _ in range(20):
        n0, sent = len(steps(log)), []
        send(port, [rng.randrange(1000) for _ in range(1857)], sent)
        time.sleep(0.3)
        new = [s for s in steps(log)[n0:] if "arrived_s" in s]
        alone.append((new[0]["arrived_s"][0] - sent[0]) * 1e3)
    print(f"alone: send -> engine median {statistics.median(alone):.2f} ms (min {min(alone):.2f}, max {max(alone):.2f})")
    for rnd in range(3):
        sent, new = burst_once(port, log, rng, 2048)
        arrived = [a for s in new if "arrived_s" in s for a in s["arrived_s"]]
        s0 = min(sent)
        print(f"burst {rnd}: sends over {1e3 * (max(sent) - s0):.1f} ms, arrivals (first..last of each pass) "
              + ", ".join(f"{1e3 * (a - s0):.1f}" for a in arrived))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
