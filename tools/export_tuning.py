"""Ship the kernel tuning picks of a GPU with the package: merge tuning-cache files into kernels/tuned/.

    python -m tools.export_tuning ~/.cache/layerstream/tuning/NVIDIA_H200-*.json

Run it on the files a GPU machine's runs left (``bench/gpu_run.sh`` copies them into its results);
the merged ``kernels/tuned/<gpu>.json`` is then read by ``kernels.tuning_defaults`` on every machine
with that GPU, so a first run there uses the measured picks instead of timing candidates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kernels.tuning_defaults import DEFAULTS_DIR, export


def main(argv: list[str] | None = None) -> int:
    """Merge the given cache files; one line per file written."""
    p = argparse.ArgumentParser(prog="python -m tools.export_tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="tuning-cache JSON files (~/.cache/layerstream/tuning)")
    p.add_argument("--out-dir", type=Path, default=DEFAULTS_DIR, help="where the shipped files live")
    args = p.parse_args(argv)
    try:
        written = export(args.files, args.out_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
