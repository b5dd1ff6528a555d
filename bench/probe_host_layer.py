"""Where a host layer's time goes on this CPU (issue 18): one decode step of one Qwen2.5-7B-shaped
layer through the host lane's ops (engine.host_lane.HostOps), against its four matmuls alone and
against one F.linear over the layer's bytes (what memory.host_rate measures).

    PYTHONPATH=. python bench/probe_host_layer.py [--context 1024] [--batch 1] [--dtype bf16] [--repeats 5]

Prints milliseconds (median of --repeats after a warm-up) and GB/s of the layer's weight bytes for:
the whole layer (norms, RoPE, KV append, attention over --context positions, the projections), its
four projections alone, the single large GEMV of memory.host_rate over the same bytes, and the
attention alone with the host KV cache in fp32 (the lane's) and in the compute dtype.
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.host_extra import decode_layer
from engine.host_lane import HostOps
from tools.bench_host_int4 import times_ms

QWEN7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True)


def _ms(fn, repeats: int) -> float:
    return times_ms(fn, repeats)[0]  # the median


def _weights(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return {"self_attn.qkv_proj.weight": rnd(q + 2 * kv, h), "self_attn.qkv_proj.bias": rnd(q + 2 * kv),
            "self_attn.o_proj.weight": rnd(h, q), "mlp.gate_up_proj.weight": rnd(2 * i, h),
            "mlp.down_proj.weight": rnd(h, i), "input_layernorm.weight": torch.ones(h, dtype=dtype),
            "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)}


def _attention_ms(cfg: ModelConfig, b: int, context: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """HostOps' decode attention alone over ``context`` positions, with the host KV cache in fp32 (the
    lane's) and in the compute dtype (what it held before): median ms of each."""
    q = torch.randn(b, 1, cfg.num_attention_heads, cfg.head_dim).to(dtype)
    start, q_lens = torch.full((b,), context - 1, dtype=torch.int32), torch.ones(b, dtype=torch.int32)
    shape = (b, cfg.num_key_value_heads, context + 8, cfg.head_dim)
    out = {}
    for name, kv_dtype in (("fp32 cache", torch.float32), (f"{dtype} cache", dtype)):
        kv = [torch.randn(shape).to(kv_dtype) for _ in range(2)]
        out[name] = _ms(lambda: HostOps().attention(q, *kv, start, q_lens, cfg.head_dim ** -0.5, context), repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = ModelConfig.from_dict(QWEN7B)
    w = _weights(cfg, dtype)
    nbytes = sum(t.nbytes for n, t in w.items() if n.endswith("proj.weight"))
    b = a.batch
    layer = _ms(decode_layer(cfg, HostOps(), w, dtype, b, a.context), a.repeats)
    x = torch.randn(b, cfg.hidden_size).to(dtype)
    xi = torch.randn(b, cfg.intermediate_size).to(dtype)
    xq = torch.randn(b, cfg.q_size).to(dtype)
    parts = {"qkv": lambda: F.linear(x, w["self_attn.qkv_proj.weight"], w["self_attn.qkv_proj.bias"]),
             "o": lambda: F.linear(xq, w["self_attn.o_proj.weight"]),
             "gate_up": lambda: F.linear(x, w["mlp.gate_up_proj.weight"]),
             "down": lambda: F.linear(xi, w["mlp.down_proj.weight"])}
    part_ms = {k: _ms(fn, a.repeats) for k, fn in parts.items()}
    big = torch.randn(nbytes // (4096 * dtype.itemsize), 4096).to(dtype)
    xb = torch.randn(b, 4096).to(dtype)
    gemv = _ms(lambda: F.linear(xb, big), a.repeats)
    gb = nbytes / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, batch {b}, context {a.context}, "
          f"layer weights {gb:.3f} GB")
    print(f"whole layer {layer:.2f} ms ({gb / layer * 1e3:.1f} GB/s)")
    print(f"four projections {sum(part_ms.values()):.2f} ms ({gb / sum(part_ms.values()) * 1e3:.1f} GB/s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in part_ms.items()))
    print(f"one GEMV over the same bytes {gemv:.2f} ms ({gb / gemv * 1e3:.1f} GB/s)")
    print(f"layer minus projections {layer - sum(part_ms.values()):.2f} ms")
    print("attention alone: " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                                          _attention_ms(cfg, b, a.context, dtype, a.repeats).items()))


if __name__ == "__main__":
    main()
