"""Old against new plain-torch decoders (GGUF blocks, then the canonical weight), bitwise and timed.
Old modules: git show 6d4fe4a:kernels/ggml_blocks.py > ggml_blocks_old.py; git show 6d4fe4a:engine/quant/spec.py > spec_old.py
(beside this file). Run from the repository root with PYTHONPATH=.:<this folder>."""
import torch, time, sys
sys.path.insert(0,'/tmp')
import ggml_blocks_old as old
import spec_old
from engine.quant import spec as new_spec
import kernels.ggml_blocks as new
torch.manual_seed(0)
def t(f, *a, reps=5):
    f(*a); ts=[]
    for _ in range(reps):
        s=time.perf_counter(); f(*a); ts.append(time.perf_counter()-s)
    return sorted(ts)[reps//2]*1e3
fields={"q8_0":[0],"q4_0":[0],"q4_1":[0,2],"q5_0":[0],"q5_1":[0,2],"q4_k":[0,2],"q5_k":[0,2],"q6_k":[208]}
for qt,(vals,size) in new.BLOCKS.items():
    n = 16_000_000//vals
    b = torch.randint(0,256,(n,size),dtype=torch.uint8)
    for off in fields[qt]:
        b[:, off:off+2] = ((torch.rand(n,1)-0.5)*0.1).to(torch.float16).view(torch.uint8)
    r=old._DECODE[qt](b); q=new._DECODE[qt](b)
    print(qt, 'bitwise', torch.equal(r,q), f"old {t(old._DECODE[qt], b):7.1f} ms new {t(new._DECODE[qt], b):7.1f} ms (16M values)")
for bits in (4,8):
  for g in (32,128,-1):
    for kind in ("zeros","sym","mins","perm"):
        n,k=2048,1024
        G = k if g==-1 else g
        q=torch.randint(-2**31,2**31-1,(n,k*bits//32),dtype=torch.int32)
        sc=(torch.rand(n,k//G)*0.02).to(torch.float16)
        z=torch.randint(0,2**bits,(n,k//G)).to(torch.float16) if kind in ("zeros","perm") else None
        mins=(torch.randn(n,k//G)*0.01).to(torch.float16) if kind=="mins" else None
        perm=torch.randperm(k).to(torch.int32) if kind=="perm" else None
        spec=new_spec.QuantSpec(bits,g,z is None,"test",mins is not None)
        w=new_spec.QuantWeight(q,sc,z,perm,spec,k,mins)
        a=spec_old.dequantize(w); b=new_spec.dequantize(w)
        print(bits,g,kind,'bitwise',torch.equal(a,b), f"old {t(spec_old.dequantize,w):6.1f} new {t(new_spec.dequantize,w):6.1f} ms")
