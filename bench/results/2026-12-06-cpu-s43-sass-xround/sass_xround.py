# Needs the XROUND configs, removed since: rerun it at commit 65bfda4 (git checkout 65bfda4).
import re, collections
from tests.test_kernels_qgemv_sm90 import compile_i8, loop_instructions, loads_after_first_dot
from kernels import qgemv_candidates as c
shapes = [(1, s) for s in c._I8_XROUND_SHAPES + [(32, 256, 4, 1, 64), (32, 256, 4, 1), (64, 256, 8, 1, 64), (32, 512, 4, 1, 64), (16, 256, 4, 1, 64)]]
shapes += [(2, s) for s in c._I8_ROWS_XROUND_SHAPES + [(32, 256, 8, 1)]]
print("rows tile warps cap | xround=0: regs stack loop BAR | xround=1: regs stack loop BAR FRND")
for rows, (bn, bk, w, st, *cap) in shapes:
    row = []
    for xr in (False, True):
        u, sass = compile_i8(rows, bn, bk, w, st, cap[0] if cap else None, xround=xr)
        row.append(f"{u.split()[0]} {u.split()[1]} loop {loop_instructions(sass)} BAR {sass.count('BAR.SYNC')}" + (f" FRND {sass.count('FRND')}" if xr else ""))
    print(f"M={rows} {bn}x{bk} w{w} cap {cap[0] if cap else 0} | " + " | ".join(row), flush=True)
