"""Where a run's time went, from a py-spy speedscope profile, optionally against a second run's.

``tools.bench_startup --profile-dir DIR`` records each run with ``py-spy record --format speedscope
--idle`` (every thread, waits included). This reads such a file and prints, per thread, the seconds
spent inside each function (inclusive: a function's callees count; each sample counts once per
function however deep the recursion), the functions of this project and the libraries' heavy
entry points (Triton's compile, torch's CUDA graph capture, imports) first. With ``--base`` it
prints the difference per function, largest first: what a fresh machine's first run spends that a
warm run does not.

    python -m tools.profile_summary first.speedscope.json --base cached.speedscope.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

# functions worth a line even outside this project: (file suffix, function name) pairs
LIBRARY = (("triton/compiler/compiler.py", "compile"), ("triton/runtime/jit.py", "_do_compile"),
           ("torch/cuda/graphs.py", "capture_begin"), ("torch/cuda/graphs.py", "capture_end"),
           ("<frozen importlib._bootstrap>", "_find_and_load"), ("threading.py", "Event.wait"),
           ("concurrent/futures/_base.py", "Future.result"), ("threading.py", "Thread.join"))
PROJECT = ("engine/", "kernels/", "memory/", "streamer/", "tools/")


def _wanted(frame: dict, root: str | None) -> bool:
    path = frame.get("file") or ""
    if any(path.endswith(f) and frame["name"] == n for f, n in LIBRARY):
        return True
    rel = path[len(root):].lstrip("/") if root and path.startswith(root) else path
    ours_elsewhere = "site-packages" not in path and any(f"/{p}" in path for p in PROJECT)  # another checkout
    return rel.startswith(PROJECT) or ours_elsewhere


def _label(frame: dict) -> str:
    path = frame.get("file") or "?"
    parts = path.split("/")
    return f"{'/'.join(parts[-2:])}:{frame['name']}"


def _thread_name(prof: dict, frames: list[dict]) -> str:
    """py-spy's thread name (``Thread 12 "name"``); the thread running the script's ``<module>`` (whose name
    py-spy cannot always read) is ``MainThread``."""
    full = prof.get("name", "?")
    name = full.split('"')[1] if full.count('"') >= 2 else full
    if not name and any(frames[i]["name"] in ("<module>", "_run_module_as_main") for st in prof["samples"] for i in st[:2]):
        return "MainThread"
    return name or full.split('"')[0].strip()


def load(path: str | Path, root: str | None = None) -> dict[str, Counter]:
    """{thread name: Counter(function label -> inclusive seconds)} of a speedscope file, plus each
    thread's total under the label ``(total)``; the threads of a pool (``name_0``, ``name_1``, ...) are
    summed under ``name_*``."""
    try:
        doc = json.loads(Path(path).read_text())
        frames, profiles = doc["shared"]["frames"], doc["profiles"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a speedscope profile ({e}); record one with "
                         "`py-spy record --format speedscope`") from e
    keep = [_wanted(f, root) for f in frames]
    labels = [_label(f) for f in frames]
    out: dict[str, Counter] = {}
    for prof in profiles:  # a pool's threads (name_0, name_1, ...) add up under name_*
        seen = out.setdefault(re.sub(r"_\d+$", "_*", _thread_name(prof, frames)), Counter())
        for stack, w in zip(prof["samples"], prof["weights"]):
            seen["(total)"] += w
            for label in {labels[i] for i in stack if keep[i]}:
                seen[label] += w
    return out


def report(run: dict[str, Counter], base: dict[str, Counter] | None = None, top: int = 25,
           min_s: float = 0.05) -> str:
    """Per thread: the ``top`` functions by seconds (or by seconds more than in ``base``)."""
    lines = []
    threads = sorted(run, key=lambda t: (t != "MainThread", -run[t]["(total)"]))
    for t in threads:
        have = run[t]
        ref = (base or {}).get(t, Counter())
        if base is not None:
            keys = set(have) | set(ref)
            rows = sorted(((have[k] - ref[k], have[k], ref[k], k) for k in keys), reverse=True)
            rows = [r for r in rows if abs(r[0]) >= min_s][:top]
            if not rows:
                continue
            lines.append(f"{t}: {have['(total)']:.2f} s against {ref['(total)']:.2f} s")
            lines += [f"  {d:+8.2f} s  {a:8.2f} vs {b:8.2f}  {k}" for d, a, b, k in rows]
        else:
            rows = [(s, k) for k, s in have.most_common() if s >= min_s][:top]
            if not rows:
                continue
            lines.append(f"{t}: {have['(total)']:.2f} s")
            lines += [f"  {s:8.2f} s  {k}" for s, k in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.profile_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="a py-spy speedscope JSON file")
    p.add_argument("--base", help="a second run's profile: print the difference per function")
    p.add_argument("--top", type=int, default=25, help="functions per thread")
    p.add_argument("--min-s", type=float, default=0.05, help="leave out functions under this many seconds")
    p.add_argument("--root", help="the project's directory on the profiled machine (paths under it count as ours)")
    args = p.parse_args(argv)
    try:
        run = load(args.profile, args.root)
        base = load(args.base, args.root) if args.base else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(run, base, args.top, args.min_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
