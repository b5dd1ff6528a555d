"""Session 50: the served steady load's prompt passes (calls 4-5, steps_awq.jsonl) through bench/mixed_passes.py.
Run from the repository root:
    python3 bench/results/2026-12-06-h100-s50/mixed_passes.py"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from bench.mixed_passes import report  # noqa: E402

print("\n".join(report([str(HERE / call / "steps_awq.jsonl") for call in ("call4", "call5")])))
