"""Inclusive and self share of each function in a py-spy ``--format raw`` profile, over the samples
whose stack holds a given frame (e.g. the probe's timed loop).

    python bench/spy_raw_summary.py PROFILE.txt[.gz] --within 'main (intake_probe.py:165)' [--top 60]
"""
from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--within", default="", help="keep samples with a frame starting with this")
    p.add_argument("--top", type=int, default=60)
    a = p.parse_args()
    incl, own, total = Counter(), Counter(), 0
    with (gzip.open if a.profile.endswith(".gz") else open)(a.profile, "rt") as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if a.within and not any(fr.startswith(a.within) for fr in frames):
                continue
            names = [re.sub(r":\d+\)", ")", fr) for fr in frames]  # a function, whatever its line
            total += int(n)
            for fn in set(names):
                incl[fn] += int(n)
            own[names[-1]] += int(n)
    print(f"{total} samples")
    for title, c in (("inclusive", incl), ("self", own)):
        print(f"-- {title}")
        for fn, n in c.most_common(a.top):
            print(f"{100 * n / total:5.1f}%  {fn[:140]}")


if __name__ == "__main__":
    main()
