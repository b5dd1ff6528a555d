"""Served prompt passes from step logs (``--step-log``): a prompt alone in its pass against prompts beside decoding
rows, by the pass's prompt tokens, and the decode steps' median (session 50's lead for issue 16's steady-load TTFT).

    python3 bench/mixed_passes.py STEPS.jsonl [STEPS.jsonl ...]
"""
from __future__ import annotations

import json
import statistics
import sys

BANDS = ((100, 600), (600, 1200), (1200, 2100), (2100, 20000))


def _summary(v: list[float]) -> str:
    return f"n={len(v)} median {statistics.median(v):.1f} ms (min {min(v):.1f})" if v else "n=0"


def report(paths: list[str]) -> list[str]:
    lines, rows = [], []
    for path in paths:
        steps = [json.loads(line) for line in open(path)]
        decode = [s["step_s"] * 1e3 for s in steps if s["tokens"] == s["batch"]]
        lines.append(f"{path}: {len(decode)} decode steps, median "
                     f"{statistics.median(decode) if decode else float('nan'):.1f} ms")
        # a pass of one sequence is its prompt alone; in a pass of several, every decoding row feeds one token
        rows += [(s["tokens"] if s["batch"] == 1 else s["tokens"] - s["batch"], s["batch"], s["step_s"] * 1e3)
                 for s in steps if s["tokens"] > s["batch"] and s["tokens"] > 100]
    for lo, hi in BANDS:
        alone = [t for p, b, t in rows if lo <= p < hi and b == 1]
        mixed = [t for p, b, t in rows if lo <= p < hi and b > 1]
        lines.append(f"prompt tokens {lo}-{hi}: alone {_summary(alone)}; beside decoding rows {_summary(mixed)}")
    return lines


if __name__ == "__main__":
    print("\n".join(report(sys.argv[1:])))
