"""Session 50: the served steady load's prompt passes (calls 4-5, steps_awq.jsonl), a prompt alone in its pass
against prompts beside decoding rows, by the pass's prompt tokens. Run from the repository root:
    python3 bench/results/2026-12-06-h100-s50/mixed_passes.py"""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
rows = []
for call in ("call4", "call5"):
    steps = [json.loads(line) for line in open(HERE / call / "steps_awq.jsonl")]
    decode = [s["step_s"] * 1e3 for s in steps if s["tokens"] == s["batch"]]
    print(f"{call}: {len(decode)} decode steps, median {statistics.median(decode):.1f} ms")
    # a pass of one sequence is its prompt alone; in a pass of several, every decoding row feeds one token
    rows += [(s["tokens"] if s["batch"] == 1 else s["tokens"] - s["batch"], s["batch"], s["step_s"] * 1e3)
             for s in steps if s["tokens"] > s["batch"] and s["tokens"] > 100]
for lo, hi in ((100, 600), (600, 1200), (1200, 2100), (2100, 20000)):
    def summary(v: list[float]) -> str:
        return f"n={len(v)} median {statistics.median(v):.1f} ms (min {min(v):.1f})" if v else "n=0"
    alone = [t for p, b, t in rows if lo <= p < hi and b == 1]
    mixed = [t for p, b, t in rows if lo <= p < hi and b > 1]
    print(f"prompt tokens {lo}-{hi}: alone {summary(alone)}; beside decoding rows {summary(mixed)}")
