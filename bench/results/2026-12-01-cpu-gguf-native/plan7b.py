import os, sys, torch
sys.path.insert(0, ".")
from engine.engine import open_model
from engine.quant.checkpoint import layer_quant
from engine.footprint import plan_model
from memory.units import parse_size
f = open_model("/tmp/q7b-gguf/model-Q4_K_M.gguf")
tb = {n: i.nbytes for n, i in f.ckpt.tensors.items()}
for native in ("1", "0"):
    os.environ["LAYERSTREAM_GGUF_NATIVE"] = native
    q = layer_quant(f.ckpt, f.cfg, None)
    for budget in ("6GiB", "4GiB"):
        p = plan_model(f.cfg, tb, torch.bfloat16, q, vram_budget=parse_size(budget), host_budget=None, batch=1,
                       max_context=4096, prefill_chunk=2048, auto_chunk=True, device_free=None, h2d_gbps=55.0,
                       h2d_source="assumed", outside_bytes=500 << 20)
        streamed = sum(p.module(f"layers.{i}").bytes for i in p.streamed_layers)
        allb = sum(m.bytes for m in p.modules if m.name.startswith("layers."))
        head = p.module("lm_head")
        print(f"native={native} {budget}: {q.label}; layers {allb/1e9:.2f} GB, resident {len(p.resident_layers)}, streamed {len(p.streamed_layers)}; lm_head {head.bytes/1e9:.2f} GB {head.placement}; {p.streamed_bytes_per_step/1e9:.2f} GB streamed per step")
