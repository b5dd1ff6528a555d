"""The int8-x GEMV's K loop with LOOKAHEAD=2 (commit 9f7590f, removed since), compiled for sm_90 by Triton 3.6 on the
CPU, with each instruction's scoreboard fields decoded from the second 64-bit word of its encoding (bits 41-44
stall, 46-48 write barrier, 49-51 read barrier, 52-57 wait mask): the loads, and every instruction that waits.
Run: git archive 9f7590f kernels tests | tar x -C /tmp/old33;
     PYTHONPATH=<triton 3.6 wheel dir>:/tmp/old33 TRITON_INTERPRET=0 python scoreboard.py"""
import re

from tests import test_kernels_qgemv_sm90 as t

usage, sass = t.compile_i8(1, 32, 256, 4, 1, lookahead=2)
lines = sass.splitlines()
ins = []
for i, line in enumerate(lines):
    m = re.match(r"\s*/\*([0-9a-f]{4})\*/\s*(.*?);\s*/\* (0x[0-9a-f]{16}) \*/", line)
    if m:
        hi = re.search(r"/\* (0x[0-9a-f]{16}) \*/", lines[i + 1])
        ins.append((int(m.group(1), 16), m.group(2).strip(), int(hi.group(1), 16)))
back = [(a, x) for a, x, _ in ins if (b := re.search(r"BRA (0x[0-9a-f]+)", x)) and int(b.group(1), 16) < a]
end, txt = back[-1]
start = int(re.search(r"BRA (0x[0-9a-f]+)", txt).group(1), 16)
print("32x256 w4 s1 LOOKAHEAD=2, one row of x:", usage)
for a, x, hi in ins:
    if start <= a <= end:
        wb, rb, wait = (hi >> 46) & 7, (hi >> 49) & 7, (hi >> 52) & 0x3F
        if "LDG" in x or wait or wb != 7:
            print(f"{a:05x} wait={wait:06b} wb={wb if wb != 7 else '-'} rb={rb if rb != 7 else '-'}  {x[:70]}")
