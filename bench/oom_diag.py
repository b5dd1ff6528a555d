"""Where the CUDA memory is when a run goes out of memory (GPU machine; a diagnostic, not a benchmark).

    python bench/oom_diag.py engine.run --model M --vram-budget 6GB ...
    python bench/oom_diag.py tools.memreport --model M ...

Runs the module's ``main`` in this process with torch's allocation history recording. On the first
out-of-memory the live allocations are grouped by the innermost frame of this project that made them
and printed (largest first), with the allocator's figures; at exit the peak is printed the same way.
"""

from __future__ import annotations

import collections
import importlib
import os
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "kernels", "memory", "streamer", "tools"))


def _where(frames: list[dict]) -> str:
    ours = [f for f in frames if f["filename"].startswith(OURS)]
    pick = ours[:3] or frames[:2]
    return " < ".join(f"{os.path.relpath(f['filename'], ROOT)}:{f['line']} {f['name']}" for f in pick)


def report(title: str) -> None:
    snap = torch.cuda.memory._snapshot()
    live: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                key = _where(b.get("frames", []))
                live[key] += b["size"]
                count[key] += 1
    total = sum(live.values())
    print(f"\n=== {title}: {total / 2**20:.1f} MiB live in {sum(count.values())} blocks; reserved "
          f"{torch.cuda.memory_reserved() / 2**20:.1f} MiB, max allocated {torch.cuda.max_memory_allocated() / 2**20:.1f}"
          f" MiB", file=sys.stderr)
    for key, n in live.most_common(40):
        print(f"{n / 2**20:10.1f} MiB {count[key]:5d}x  {key}", file=sys.stderr)
    sys.stderr.flush()


def holders() -> None:
    """What refers to the large CUDA tensors alive now (two levels up), to find who keeps them."""
    import gc
    big = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda
           and o.untyped_storage().nbytes() >= (8 << 20)]
    for t in big[:40]:
        refs = [r for r in gc.get_referrers(t) if r is not big]
        desc = []
        for r in refs[:4]:
            up = [type(u).__name__ + (f":{u.f_code.co_name}@{u.f_lineno}" if hasattr(u, "f_code") else "")
                  for u in gc.get_referrers(r)[:4] if u is not refs]
            name = type(r).__name__ + (f":{r.f_code.co_name}@{r.f_lineno}" if hasattr(r, "f_code") else "")
            desc.append(f"{name}<-{up}")
        print(f"  {tuple(t.shape)} {t.untyped_storage().nbytes() >> 20} MiB held by {desc}", file=sys.stderr)


def main() -> None:
    module, argv = sys.argv[1], sys.argv[2:]
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    seen = []

    def on_oom(device, alloc, device_alloc, device_free):
        seen.append(alloc)
        if len(seen) <= 3:  # the first few (a tuner's is caught and logged; the run's is not)
            print(f"\nOOM #{len(seen)}: asked for {alloc / 2**20:.1f} MiB, from:", file=sys.stderr)
            traceback.print_stack(limit=12, file=sys.stderr)
            report(f"live at out-of-memory #{len(seen)}")
            holders()

    torch._C._cuda_attach_out_of_memory_observer(on_oom)
    sys.argv = [module] + argv
    try:
        rc = importlib.import_module(module).main()
        print(f"main returned {rc}", file=sys.stderr)
    except SystemExit as e:
        print(f"exit {e.code}", file=sys.stderr)
    if not seen:
        report("live at exit (no out-of-memory)")


if __name__ == "__main__":
    main()
