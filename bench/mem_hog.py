"""A memory-bandwidth hog for the host lane's guard (issue 18): ``--threads`` torch threads copying a 1 GiB buffer
for ``--seconds``, as another tenant of the host would. Session 40 ran engine.run beside it (session_run.sh K):
the lane planned from the rates measured without it lost, and the guard retired it.

    PYTHONPATH=. python bench/mem_hog.py --threads 12 --seconds 140 &
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--seconds", type=float, default=140.0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = torch.ones(1 << 30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    end, copies = time.monotonic() + args.seconds, 0
    while time.monotonic() < end:
        dst.copy_(src)
        copies += 1
    print(f"mem_hog: {copies} copies of 1 GiB in {args.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
