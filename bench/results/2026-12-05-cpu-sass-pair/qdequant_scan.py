# The scan behind qdequant.txt: PYTHONPATH=<triton 3.6 wheel dir>:. TRITON_INTERPRET=0 python <this file>
import sys, re
sys.path.insert(0,'.')
from tests.test_kernels_qgemv_sm90 import compile_sm90
from kernels import qdequant as m
for odt, bn in (("*bf16", 32), ("*fp32", 16)):
    for bits in (4, 8):
        ptrs={"q_ptr":"*i32","s_ptr":"*fp16","z_ptr":"*fp16","out_ptr":odt}
        meta=dict(HAS_ZEROS=True,HAS_MINS=False,BITS=bits,BLOCK_N=bn,BLOCK_K=256,SCALE_MODE=1,GROUP_C=128,EVEN_K=True)
        u,s=compile_sm90(m._qdequant_kernel, ptrs, meta, 8, 1, aligned_ints=("N","K","group","stride_qn","stride_sn","stride_on"))
        ops=[l for l in s.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", l)]
        first=next(i for i,l in enumerate(ops) if "LDG" in l)
        print(odt, bits, u.split()[0], "STACK", u.split("STACK:")[1].split()[0], f"first load {first} of {len(ops)}, MUFU before {sum('MUFU' in o for o in ops[:first])}")
