"""Each prompt pass of a server's ``--step-log`` (at least ``--min-tokens`` fed): its time, its time a token and the
allocator counters that grew in it (engine.serving.steplog.AllocCounts: new pinned host blocks, device allocations,
retries, device-wide syncs), in order. A server's first burst against its later ones, one line a pass."""

from __future__ import annotations

import argparse
import json
import sys

from tools.ttft_breakdown import ALLOC_KEYS


def lines(steps: list[dict], min_tokens: int) -> list[str]:
    out = []
    for x in steps:
        if x["tokens"] >= min_tokens:
            grown = {k: x[k] for k in ALLOC_KEYS if x.get(k)}
            out.append(f"pass {x['step']:5d}  {x['tokens']:6d} tokens  {x['step_s'] * 1e3:7.1f} ms  "
                       f"{x['step_s'] * 1e6 / x['tokens']:5.1f} us a token  batch {x['batch']:3d}"
                       + (f"  {grown}" if grown else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("step_log", help="a server's --step-log (JSON lines)")
    ap.add_argument("--min-tokens", type=int, default=1000, help="passes feeding at least this many tokens")
    args = ap.parse_args(argv)
    try:
        with open(args.step_log, encoding="utf-8") as f:
            steps = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {args.step_log} as a step log ({e}); give a server's --step-log file", file=sys.stderr)
        return 2
    print("\n".join(lines(steps, args.min_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
