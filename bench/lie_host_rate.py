"""Scale the host-rate cache's host GEMV entries (issue 18's guard on a GPU): a plan from rates ``--scale`` times what
this host achieves puts too many layers on the CPU, so the run's decode steps lose to streaming and the guard
(engine.lane_guard) must retire the lane. ``--restore`` puts the saved cache back.

    python bench/lie_host_rate.py --scale 4     # saves bandwidth.json as bandwidth.json.truth first
    python bench/lie_host_rate.py --restore
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from memory.bandwidth import default_cache_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scale", type=float, help="multiply every host GEMV rate by this")
    g.add_argument("--restore", action="store_true", help="put back the cache saved by --scale")
    args = p.parse_args(argv)
    path = default_cache_path()
    saved = path.with_name(path.name + ".truth")
    if args.restore:
        shutil.move(saved, path)
        print(f"restored {path}")
        return 0
    data = json.loads(path.read_text())
    shutil.copy(path, saved)
    hits = [k for k in data["entries"] if k.startswith("host gemv")]
    for k in hits:
        data["entries"][k]["gbps"] *= args.scale
        print(f"{k}: now {data['entries'][k]['gbps']:.1f} GB/s")
    if not hits:
        print("no host gemv entry to scale: run --host-compute auto once first", file=sys.stderr)
        return 1
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
