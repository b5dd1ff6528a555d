"""The ladder's L0 (bench/probe_ladder.py) and the access probe's rows kernel (bench/probe_access.py) compiled for
sm_90 on the CPU (Triton's bundled ptxas and cuobjdump; no GPU), in bench/probe_pair.py's tiles: whether their K
loops are the same instructions, and how long each whole kernel is. Session 34 timed them 1.6x apart in one tile on
the H200. Run with TRITON_INTERPRET=0; PYTHONPATH picks the Triton (the GPU machine has 3.6)."""
from __future__ import annotations

import os
import re
import sys

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.probe_access import _read_kernel  # noqa: E402
from bench.probe_ladder import GROUP, _ladder_kernel  # noqa: E402
from bench.probe_pair import TILES  # noqa: E402
from tests.test_kernels_qgemv_sm90 import ALIGNED_INTS, _loop_body, compile_sm90  # noqa: E402

LADDER_PTRS = {"xq_ptr": "*i32", "d_ptr": "*fp32", "qs_ptr": "*i32", "q_ptr": "*i32", "s_ptr": "*fp16",
               "z_ptr": "*fp16", "out_ptr": "*fp32"}


def instructions(sass: str) -> list[str]:
    """The kernel's instructions, addresses and encodings dropped, registers renamed away (R7 -> R)."""
    ops = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in sass.splitlines()
           if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line)]
    return [normal(op) for op in ops]


def normal(op: str) -> str:
    """An instruction without its encoding, with its registers and predicates renamed away (R7 -> R, P1 -> P)."""
    op = re.sub(r"BRA 0x[0-9a-f]+", "BRA", op.split(";")[0].replace(".reuse", ""))
    return re.sub(r"\s+", " ", re.sub(r"\bU?P\d\b", "P", re.sub(r"\bU?R\d+\b", "R", op))).strip()


def main() -> int:
    print(f"triton {triton.__version__}, sm_90, int32 codes [N, K / 8], K = 3584 (KW = 448, 16-divisible)")
    for bn, bk, warps, sk in TILES:
        ladder = compile_sm90(_ladder_kernel, LADDER_PTRS, dict(LEVEL=0, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, WRAP=True,
                                                                GROUP_C=GROUP, STAGES=1), warps, 1)
        access = compile_sm90(_read_kernel, {"w_ptr": "*i32", "out_ptr": "*i32"},
                              dict(TILED=False, BLOCK_N=bn, BW=bk // 8, SPLIT=sk, STAGES=1), warps, 1,
                              aligned_ints=ALIGNED_INTS + ("KW",))
        loops = [[normal(op) for op in _loop_body(s)] for _, s in (ladder, access)]
        loads = [sum(1 for op in loop if "LDG" in op) for loop in loops]
        whole = [len(instructions(s)) for _, s in (ladder, access)]
        same = ("the same" if loops[0] == loops[1] else "the same instructions in another order"
                if sorted(loops[0]) == sorted(loops[1]) else "different")
        print(f"{bn:>3}x{bk:<4} w{warps} sk{sk}: K loops {same} ({len(loops[0])} / {len(loops[1])} instructions, "
              f"{loads[0]} / {loads[1]} loads, widths {widths(loops[0])} / {widths(loops[1])}); whole kernels "
              f"{whole[0]} / {whole[1]} instructions; registers {ladder[0].split()[0]} / {access[0].split()[0]}",
              flush=True)
    return 0


def widths(loop: list[str]) -> str:
    """The load opcodes of a loop with their counts, e.g. ``LDG.E.EF.128 x4``."""
    counts: dict[str, int] = {}
    for op in loop:
        if "LDG" in op:
            name = op.split()[0] if not op.startswith("@") else op.split()[1]
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


if __name__ == "__main__":
    raise SystemExit(main())
