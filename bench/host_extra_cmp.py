"""A 7B-shaped host layer's time beyond its projections (engine.host_extra.layer_extra_s), bf16, one torch thread,
at batch 1 / 16 positions, batch 1 / 1,024 and batch 4 / 1,024: the median of 5 runs of 41 timed calls each.
Run from a checkout (or a worktree of an older commit, with PYTHONPATH pointing at it) to compare versions:

    PYTHONPATH=. python bench/host_extra_cmp.py
"""
import torch
from engine.config import ModelConfig
from engine.host_extra import layer_extra_s
QWEN7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=1000, max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=True)
cfg = ModelConfig.from_dict(QWEN7B)
torch.set_num_threads(1)
for b, ctx in ((1, 16), (1, 1024), (4, 1024)):
    r = sorted(layer_extra_s(cfg, torch.bfloat16, b, ctx, repeats=41) for _ in range(5))
    print(f"batch {b}, {ctx} positions: median of 5 runs {r[2]*1e3:.3f} ms (runs: {', '.join(f'{x*1e3:.3f}' for x in r)})")
