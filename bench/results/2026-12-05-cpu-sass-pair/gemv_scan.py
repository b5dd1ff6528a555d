# The scan behind gemv_*.txt: PYTHONPATH=<triton 3.6 wheel dir>:. TRITON_INTERPRET=0 python <this file>
import sys
sys.path.insert(0,'.')
from tests.test_kernels_qgemv_sm90 import compile_sm90
from kernels import gemv as g
ptrs={"x_ptr":"*bf16","w_ptr":"*bf16","b_ptr":"*bf16","out_ptr":"*bf16","ws_ptr":"*fp32","cnt_ptr":"*i32"}
bad=0
for bm, shapes in ((1, [(s,False) for s in g._FMA_SHAPES]), (4, [(s,False) for s in g._DOT_SHAPES]+[(s,True) for s in g._SWAP_SHAPES])):
    for (bn,bk,w,st),swap in shapes:
        for sk in (1,2):
            meta=dict(HAS_BIAS=False,IS_FP32=False,UPCAST=False,BLOCK_M=bm,BLOCK_N=bn,BLOCK_K=bk,SPLIT_K=sk,EVEN_K=True,SWAP_AB=swap,TICKET=sk>1)
            try:
                u,_=compile_sm90(g._gemv_kernel, ptrs, meta, w, st, aligned_ints=("N","K","stride_xm","stride_wn","stride_om"))
            except Exception as e:
                print(bm,bn,bk,w,st,swap,sk,'ERR',str(e)[:80]); continue
            stack=u.split("STACK:")[1].split()[0]; reg=u.split()[0]
            print(f"M{bm} {bn}x{bk} w{w} s{st} swap{int(swap)} sk{sk}: {reg} STACK {stack}")
