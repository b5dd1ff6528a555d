"""Where a load test's time to first token went: each request against the server's passes.

    python -m tools.ttft_breakdown serve.json steps.jsonl [--config server] [--clients 16]

``serve.json`` is ``tools.bench_serve --json``'s output (its rows carry each request's send and first-token
times on ``time.monotonic()``), ``steps.jsonl`` the server's ``--step-log`` (one line per pass, its end as
``mono_s`` on the same clock: run both on one host). Per level: the TTFT p50, how many passes ended between a
request's send and its first token (the pass that produced the token included), and for the request at the
median TTFT each of those passes: when it started relative to the send (negative: already running), how long it took, the sequences it
carried, the tokens it fed, how many sequences still waited and when the sequences it admitted arrived (tokenized,
in the server: the front end's share of the wait). Issue 16's target reads straight off it: a
TTFT of two decode passes plus the request's own prefill. ``target_lines`` prints it from the run's own figures,
with the floor no schedule can beat: before the median request's rank of first tokens exist, that many prompts
must have been computed, the shortest ones at best.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from engine.serving.passcost import BOUND  # a pass with prompts longer than this many steps was bound by its tokens


def load_steps(path: Path) -> list[dict]:
    """The step log's passes that carry ``mono_s`` (older logs do not), in order."""
    steps = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line; give the server's --step-log file") from None
        if "mono_s" in rec:
            steps.append(rec)
    if not steps:
        raise ValueError(f"{path}: no pass with 'mono_s' (a step log from before it was recorded?)")
    return steps


def passes_of(req: dict, steps: list[dict]) -> list[dict]:
    """The passes that ended after the request was sent and no later than its first token arrived."""
    return [s for s in steps if req["sent_s"] < s["mono_s"] <= req["first_s"]]


def answered(row: dict) -> list[dict]:
    """The row's requests that got a first token, by TTFT."""
    return sorted((r for r in row.get("per_request", []) if r["first_s"] is not None),
                  key=lambda r: r["first_s"] - r["sent_s"])


def _arrivals(step: dict, sent_s: float) -> str:
    """Where the pass admitted sequences: when the first and last of them arrived (tokenized, in the server),
    relative to the request's send (older step logs do not say)."""
    if not step.get("arrived_s"):
        return ""
    first, last = ((t - sent_s) * 1e3 for t in step["arrived_s"])
    got = ""
    if step.get("received_s"):  # since the server logs when each request reached its app
        a, b = ((t - sent_s) * 1e3 for t in step["received_s"])
        got = f" (received {a:+.1f}..{b:+.1f})"
    return f"  admitted arrivals {first:+.1f}..{last:+.1f} ms{got}"


ALLOC_KEYS = ("dev_allocs", "alloc_retries", "alloc_syncs", "host_allocs", "host_alloc_us")  # engine.serving.steplog


def _allocs(step: dict) -> str:
    """The allocator counters that grew in the pass (step logs since session 55), e.g. new pinned host blocks."""
    grown = [f"{k} {step[k]}" for k in ALLOC_KEYS if step.get(k)]
    return f"  [{', '.join(grown)}]" if grown else ""


def level_report(row: dict, steps: list[dict]) -> list[str]:
    """Lines for one bench_serve row (a config at one concurrency level)."""
    reqs = answered(row)
    head = f"{row['config']}, {row['clients']} clients"
    if not reqs:
        return [f"{head}: no request got a first token"]
    counts = [len(passes_of(r, steps)) for r in reqs]
    mid = reqs[len(reqs) // 2]
    lines = [f"{head}: TTFT p50 {(mid['first_s'] - mid['sent_s']) * 1e3:.0f} ms; passes before the first token: "
             f"median {statistics.median(counts):g}, min {min(counts)}, max {max(counts)}",
             f"  the median request ({mid['prompt_tokens']} prompt tokens), its passes:"]
    for s in passes_of(mid, steps):
        start = s["mono_s"] - s["step_s"] - mid["sent_s"]
        lines.append(f"    {start * 1e3:+8.0f} ms  {s['step_s'] * 1e3:6.0f} ms  batch {s['batch']:3d}  "
                     f"tokens {s['tokens']:6d}  waiting {s['waiting']}"
                     + (f"  compiles {s['compiles']}" if s.get("compiles") else "")
                     + _arrivals(s, mid["sent_s"]) + _allocs(s))
        lines += [f"      built {b}" for b in s.get("built", [])]
    lines.append(f"    first token at +{(mid['first_s'] - mid['sent_s']) * 1e3:.0f} ms")
    return lines


def target_lines(row: dict, steps: list[dict]) -> list[str]:
    """Issue 16's TTFT target for one level from the run's own figures: the step is the level's ITL p50, a prompt
    token's cost the level's prompt passes bound by their tokens (seconds over tokens), the median request's own
    prefill one pass of its prompt alone (at least one step: a streamed pass pays one stream of the weights). The
    floor: giving ``k`` requests (the median's rank) their first token computes at least the ``k`` shortest prompts."""
    reqs, step = answered(row), row.get("itl_p50_s")
    if not reqs or not step:
        return []
    lo, hi = min(r["sent_s"] for r in reqs), max(r["first_s"] for r in reqs)
    bound = [s for s in steps if lo < s["mono_s"] <= hi and s["tokens"] > s["batch"] and s["step_s"] > BOUND * step]
    if not bound:
        return ["  target: no prompt pass of this level was bound by its tokens (they hid under the stream)"]
    token_s = sum(s["step_s"] for s in bound) / sum(s["tokens"] for s in bound)
    mid, k = reqs[len(reqs) // 2], len(reqs) // 2 + 1
    own = max(step, mid["prompt_tokens"] * token_s)
    target, ttft = 2 * step + own, mid["first_s"] - mid["sent_s"]
    shortest = sum(sorted(r["prompt_tokens"] for r in reqs)[:k])
    return [f"  target: 2 steps ({step * 1e3:.0f} ms, the ITL p50) + its own prefill ({mid['prompt_tokens']} tokens at "
            f"{token_s * 1e6:.1f} us a token, at least one step: {own * 1e3:.0f} ms) = {target * 1e3:.0f} ms; "
            f"TTFT p50 {ttft * 1e3:.0f} ms ({ttft / target:.2f}x): {'met' if ttft <= target else 'missed'}",
            f"  floor: {k} first tokens need at least the {k} shortest prompts computed ({shortest} tokens, "
            f"{shortest * token_s * 1e3:.0f} ms at that cost)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.ttft_breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("serve_json", type=Path, help="tools.bench_serve --json output")
    p.add_argument("step_log", type=Path, help="the server's --step-log file")
    p.add_argument("--config", default="server", help="rows of this config (server, resident; default server)")
    p.add_argument("--clients", default="", help="comma-separated levels (default: all)")
    args = p.parse_args(argv)
    try:
        rows = json.loads(args.serve_json.read_text())
        steps = load_steps(args.step_log)
        levels = {int(c) for c in args.clients.split(",") if c.strip()}
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = [r for r in rows if r.get("config") == args.config and (not levels or r.get("clients") in levels)]
    if not chosen:
        print(f"error: {args.serve_json} has no {args.config!r} row at those levels", file=sys.stderr)
        return 2
    for row in chosen:
        print("\n".join(level_report(row, steps) + target_lines(row, steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
