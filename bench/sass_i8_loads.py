"""The int8-x GEMV's (kernels/qgemv_i8.py) global loads per K-loop iteration, compiled for sm_90 on the CPU
(Triton's bundled ptxas and cuobjdump; no GPU), for the H200's shipped batch-1 tiles (16-row, capped at 64
registers): each load's opcode (its width) and what it reads, and how far into the kernel its first load
comes (the prologue's latency before any byte is asked for). Run with TRITON_INTERPRET=0; PYTHONPATH picks the
Triton (the GPU machine has 3.6)."""
from __future__ import annotations

import os
import re
import sys

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.test_kernels_qgemv_sm90 import _loop_body, compile_i8  # noqa: E402

TILES = [(16, 512, 4, 1, 64), (16, 1024, 8, 1, 64), (32, 256, 4, 1, 64)]  # BLOCK_N, BLOCK_K, warps, stages, cap
WHAT = {"LDG.E.EF.128": "codes", "LDG.E.EL.128": "x words", "LDG.E.EL.64": "x words (half runs)",
        "LDG.E.EL": "x steps / code sums", "LDG.E.U16": "scales / zero points"}


def main() -> int:
    print(f"triton {triton.__version__}, sm_90, int4 g128 zeros, K = 3584, one row of x")
    for bn, bk, warps, stages, cap in TILES:
        usage, sass = compile_i8(1, bn, bk, warps, stages, cap)
        counts: dict[str, int] = {}
        for line in _loop_body(sass):
            m = re.match(r"(?:@!?P\d\s+)?(LDG\S*)", line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        loads = ", ".join(f"{n} {op} ({WHAT.get(op, '?')})" for op, n in sorted(counts.items()))
        ops = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line)]
        first = next(i for i, line in enumerate(ops) if "LDG" in line)
        print(f"{bn:>3}x{bk:<5}w{warps} cap {cap}: {sum(counts.values())} loads an iteration: {loads}; "
              f"loop {len(_loop_body(sass))} instructions, {usage.split()[0]}; the kernel's first load is its "
              f"instruction {first} of {len(ops)}, after {sum('MUFU' in op for op in ops[:first])} MUFU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
