"""Issue 16's intake: how fast a server takes in a burst of 16 requests (each reaching the engine: the step log's
``arrived_s``), with the gather window held at 25 ms so every burst is taken in before its pass begins.

    python bench/probe_intake.py serve [--hop] -- ENGINE.SERVE ARGS (with --step-log LOG)
    python bench/probe_intake.py burst PORT LOG [ROUNDS]

``--hop``: every prompt tokenized in a thread (the server before session 49, which tokenizes token ids and short
texts on the event loop). ``burst``: ROUNDS bursts of 16 streamed one-token completions (128-1,024 random ids),
sent at once from 16 threads (bench/probe_frontend.burst_once); each round's first pass and its arrivals, then the median last arrival.
"""
from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.probe_frontend import burst_once  # noqa: E402


def burst(port: int, log: str, rounds: int) -> None:
    rng = random.Random(1)
    lasts, spreads = [], []
    for r in range(rounds):
        sent, new = burst_once(port, log, rng, 1024)
        first = next(s for s in new if "arrived_s" in s)
        s0, (a0, a1) = min(sent), first["arrived_s"]
        lasts.append((a1 - s0) * 1e3)
        spreads.append((max(sent) - s0) * 1e3)
        print(f"round {r}: sends over {spreads[-1]:.1f} ms, first pass batch {first['batch']}, arrivals "
              f"+{(a0 - s0) * 1e3:.1f}..+{lasts[-1]:.1f} ms")
    print(f"median last arrival +{statistics.median(lasts):.1f} ms after the first send "
          f"(sends over {statistics.median(spreads):.1f} ms)")


def serve(argv: list[str]) -> int:
    import engine.serving.app as app_mod
    import engine.serving.loop as loop_mod
    from engine.serve import main

    loop_mod.gather_window = lambda engine: 0.025
    if argv and argv[0] == "--hop":
        app_mod.INLINE_TEXT_CHARS = -1
        argv = argv[1:]
    return main(argv[1:] if argv and argv[0] == "--" else argv)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2:]))
    burst(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 8)
