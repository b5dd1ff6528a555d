"""Where did a served pass's memory go when it ran out? On the GPU machine, put this folder on PYTHONPATH and set
OOM_DUMP=<file.json>: a ``python -m engine.serve`` process records its allocations' Python stacks (torch's memory
history) and, the first time the caching allocator runs out of memory, writes the live blocks as JSON: their bytes
summed by the innermost project frame, and the 40 largest with their project frames (OOM_DUMP's name + .1, .2, ... for
the first five: a caught one, e.g. a tuning candidate's, may come first). Other processes are untouched.

    AB_ORDER=c3k AB_ARGS_c3k="--prefill-chunk 3072" \
      AB_ENV_c3k="PYTHONPATH=$PWD:$PWD/bench/oomsite OOM_DUMP=$OUT/oom.json" bash bench/ab_serve.sh
"""

import json
import os
import sys

_PROJECT = ("/engine/", "/kernels/", "/memory/", "/streamer/", "/tools/")


def _ours(frames: list[dict]) -> list[str]:
    return [f"{f['filename'].rsplit('/', 2)[-2]}/{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
            for f in frames if any(p in f["filename"] for p in _PROJECT)]


def _dump(path: str, device: int, alloc: int, device_alloc: int, device_free: int) -> None:
    import torch

    live, by_site, segments = [], {}, {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        key = f"stream {seg.get('stream')} pool {seg.get('segment_pool_id')} {seg.get('segment_type')}" + \
            (" expandable" if seg.get("is_expandable") else "")
        agg = segments.setdefault(key, {"segments": 0, "total_mib": 0.0, "allocated_mib": 0.0})
        agg["segments"] += 1
        agg["total_mib"] += seg["total_size"] / 2**20
        agg["allocated_mib"] += seg["allocated_size"] / 2**20
        for b in seg["blocks"]:
            if b["state"] != "active_allocated":
                continue
            ours = _ours(b.get("frames", []))
            site = ours[0] if ours else "(no project frame)"
            by_site[site] = by_site.get(site, 0) + b["size"]
            live.append((b["size"], ours[:8]))
    live.sort(key=lambda x: -x[0])
    report = {"failed_alloc_bytes": alloc, "allocated_bytes": torch.cuda.memory_allocated(device),
              "reserved_bytes": torch.cuda.memory_reserved(device), "device_allocated": device_alloc,
              "device_free": device_free, "live_blocks": len(live), "segments": segments,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "by_innermost_frame_mib": {k: round(v / 2**20, 1)
                                         for k, v in sorted(by_site.items(), key=lambda x: -x[1])},
              "largest": [{"mib": round(s / 2**20, 1), "frames": f} for s, f in live[:40]]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _install() -> None:
    path = os.environ.get("OOM_DUMP")
    if not path or "engine.serve" not in " ".join(getattr(sys, "orig_argv", [])):
        return
    import torch

    if not torch.cuda.is_available():
        return
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    done = []

    def observer(device, alloc, device_alloc, device_free):
        if len(done) < 5:
            done.append(1)
            try:
                _dump(f"{path}.{len(done)}", device, alloc, device_alloc, device_free)
            except Exception as e:  # a diagnostic: never the cause of another failure
                print(f"oomsite: could not write {path}: {e}", file=sys.stderr)

    torch._C._cuda_attach_out_of_memory_observer(observer)
    print(f"oomsite: recording allocation stacks; an out-of-memory writes {path}.N", file=sys.stderr)


_install()
