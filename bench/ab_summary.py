"""Summarise a bench/ab_serve.sh output folder: each run's burst passes, TTFT and scaling, then each arm's medians.

    python bench/ab_summary.py OUT [OUT ...]

A run is a folder ``<n><arm>`` holding ``steps.jsonl`` (the server's step log) and ``serve.json`` (tools.bench_serve's
levels). A burst pass is a step that fed prompts to more than one sequence (tokens > batch + 8, batch > 1); the
1-client prompt pass is listed apart. Session 29 found the same code's first burst pass 281-840 ms from machine to
machine, so arms compare only within one folder (one machine), and a run whose server never got ready is listed
without numbers.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def run_rows(out: Path) -> list[dict]:
    rows = []
    for d in sorted((p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"\d+\w+", p.name)),
                    key=lambda p: int(re.match(r"\d+", p.name).group())):
        arm = re.sub(r"^\d+", "", d.name)
        steps = [json.loads(x) for x in (d / "steps.jsonl").read_text().splitlines()] \
            if (d / "steps.jsonl").exists() else []
        prompts = [s for s in steps if s["tokens"] > s["batch"] + 8]
        levels = json.loads((d / "serve.json").read_text()) if (d / "serve.json").exists() else []
        rows.append({"run": d.name, "arm": arm,
                     "single": [round(s["step_s"] * 1e3) for s in prompts if s["batch"] == 1],
                     "burst": [round(s["step_s"] * 1e3) for s in prompts if s["batch"] > 1],
                     "ttft": [round(lv["ttft_p50_s"] * 1e3) for lv in levels if lv["clients"] > 1],
                     "vs_one": [round(lv["vs_one"], 2) for lv in levels if "vs_one" in lv]})
    return rows


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for out in map(Path, argv):
        if not out.is_dir():
            print(f"error: {out} is not a folder (give bench/ab_serve.sh's $OUT)", file=sys.stderr)
            return 2
        rows = run_rows(out)
        print(f"== {out}")
        for r in rows:
            print(f"  {r['run']:>10}: 1-client pass {r['single']} ms; burst passes {r['burst']} ms; "
                  f"TTFT p50 {r['ttft']} ms; vs one client {r['vs_one']}")
        for arm in dict.fromkeys(r["arm"] for r in rows):
            mine = [r for r in rows if r["arm"] == arm and r["burst"]]
            if not mine:
                continue
            first, every = [r["burst"][0] for r in mine], [b for r in mine for b in r["burst"]]
            ttft = [t for r in mine for t in r["ttft"]]
            print(f"  {arm:>10}: first burst pass median {statistics.median(first):.0f} ms of {first}; every burst "
                  f"pass median {statistics.median(every):.0f} ms of {len(every)}"
                  + (f"; TTFT p50 median {statistics.median(ttft):.0f} ms of {ttft}" if ttft else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
