"""The plain int8-x GEMV's K loop (32x256, 4 warps, one row of x, Triton 3.6, sm_90): where its loads sit against
the first dot products (IDP), which wait for the code loads. Run from a tree holding the kernel:
PYTHONPATH=<triton 3.6 wheel dir>:<tree> TRITON_INTERPRET=0 python load_order.py"""
from tests.test_kernels_qgemv_sm90 import _loop_body, compile_i8

usage, sass = compile_i8(1, 32, 256, 4, 1)
body = _loop_body(sass)
print(f"loop of {len(body)} instructions; {usage}")
for i, line in enumerate(body):
    if "LDG" in line or ("IDP" in line and i < 40):
        print(i, line.split(";")[0].strip())
