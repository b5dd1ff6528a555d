"""Plans (no weights, no file) for a preset stored as a llama.cpp GGUF of one file type: its layers held
as the file's blocks (where the kernels decode every type), repacked into the canonical int4/int8 forms,
and the same model as AWQ int4 g128. Types per tensor come from engine.gguf.writer.tensor_type (llama.cpp's
mix and fallbacks); figures are the planner's (memory.planner), for a CUDA device with 500 MiB outside
torch's allocator and 55 GB/s H2D (the H200's), batch 1, context 4096.

    python plan_gguf.py qwen2.5-72b Q4_K_M 24GB,40GB
"""
import sys

import torch

sys.path.insert(0, ".")
from engine.config import ModelConfig  # noqa: E402
from engine.footprint import plan_model  # noqa: E402
from engine.gguf.checkpoint import KERNEL_TYPES  # noqa: E402
from engine.gguf.repack import target_for  # noqa: E402
from engine.gguf.writer import gguf_name, tensor_type  # noqa: E402
from engine.quant.ggml import MODULES  # noqa: E402
from engine.quant.layout import FUSED_LINEARS, LayerQuant, linear_shapes  # noqa: E402
from engine.quant.spec import QuantSpec  # noqa: E402
from engine.synth.presets import PRESETS  # noqa: E402
from memory.units import parse_size  # noqa: E402

preset, file_type, budgets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
raw = dict(PRESETS[preset])
raw["vocab_size"] = raw.get("vocab_size") or 152064
cfg = ModelConfig.from_dict(raw)
shapes = linear_shapes(cfg)
n = cfg.num_hidden_layers
types = [{m: tensor_type(file_type, gguf_name(f"model.layers.{i}.{m}.weight"), shapes[m], n) for m in MODULES}
         for i in range(n)]
head = tensor_type(file_type, "output.weight", (cfg.vocab_size, cfg.hidden_size), n)
print(f"{preset} {file_type}: layer types {sorted({t.name for ty in types for t in ty.values()})}, output {head.name}")
quants = {}
if all(t in KERNEL_TYPES for ty in types for t in ty.values()):
    quants["native"] = LayerQuant(QuantSpec(4, 32, True, "gguf", mins=True), torch.float32,
                                  native=tuple(tuple(KERNEL_TYPES[ty[m]] for m in MODULES) for ty in types),
                                  native_head=KERNEL_TYPES.get(head))
else:
    print("native: not possible, a layer type has no kernel:", sorted({t.name for ty in types for t in ty.values()
                                                                      if t not in KERNEL_TYPES}))
forms = {f: target_for({ty[m] for ty in types for m in parts}) for f, parts in FUSED_LINEARS.items()}
widest = max(forms.values(), key=lambda t: (t.spec.bits, t.scale_dtype.itemsize, t.spec.mins))
quants["repacked"] = LayerQuant(widest.spec, widest.scale_dtype,
                                forms=tuple((f, t.spec, t.scale_dtype) for f, t in sorted(forms.items())))
quants["awq-int4-g128"] = LayerQuant(QuantSpec(4, 128, False, "awq"), torch.float16)
for name, q in quants.items():
    for budget in budgets:
        p = plan_model(cfg, None, torch.bfloat16, q, vram_budget=parse_size(budget), host_budget=None, batch=1,
                       max_context=4096, prefill_chunk=2048, auto_chunk=True, device_free=None, h2d_gbps=55.0,
                       h2d_source="assumed", outside_bytes=500 << 20)
        layers = sum(m.bytes for m in p.modules if m.name.startswith("layers."))
        h = p.module("lm_head")
        print(f"  {name:14s} {budget:>5s}: layers {layers / 1e9:6.2f} GB, {len(p.resident_layers):3d} resident / "
              f"{len(p.streamed_layers):3d} streamed, lm_head {h.bytes / 1e9:.2f} GB {h.placement}; "
              f"{p.streamed_bytes_per_step / 1e9:6.2f} GB per decode step, predicted {p.predicted_step_s * 1e3:7.1f} ms")
