"""Largest |value| each engine op produces in one prefill, on any device (the CPU included): where a
dtype's range runs out.

    python bench/act_max_probe.py --model DIR [--dtype fp16] [--device cpu] [--tokens 48]

Every op of the engine's TorchOps is wrapped; per op it prints the calls, the largest |output| (inf where
an output is not finite), the first call whose output was not, and the five largest. A tuple's later
outputs (add_rmsnorm's residual) get their own rows, ``op[1]``. On the CPU this found why the synthetic 7B
AWQ's logits were NaN in fp16 (bench/results/2026-12-03-cpu-awq-fp16/).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.engine import Engine, EngineOptions  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402

OPS = ("embedding", "rmsnorm", "add_rmsnorm", "add_rmsnorm_linear", "linear", "swiglu", "swiglu_linear",
       "attention")


def biggest(t: torch.Tensor) -> float:
    return t.float().abs().max().item() if torch.isfinite(t).all() else float("inf")


def record(ops, seen: dict[str, list[float]]) -> None:
    """Wrap ``ops``' methods so that each call appends its outputs' largest |value| to ``seen``."""
    for name in OPS:
        real = getattr(ops, name)

        def wrapped(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            for j, t in enumerate(out if isinstance(out, tuple) else (out,)):
                if torch.is_tensor(t):
                    seen[_name if j == 0 else f"{_name}[{j}]"].append(biggest(t))
            return out
        setattr(ops, name, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=48)
    a = p.parse_args()
    eng = Engine(a.model, EngineOptions(device=a.device, dtype=a.dtype, kernels="torch", max_context=a.tokens + 1,
                                        vram_budget=64 << 30))
    seen: dict[str, list[float]] = collections.defaultdict(list)
    record(eng.model.ops, seen)
    ids = torch.randint(0, eng.cfg.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    cache = KVCache(eng.cfg, 1, a.tokens + 1, eng.dtype, eng.device)
    with torch.no_grad():
        logits = eng.model.forward(ids.to(eng.device), torch.zeros(1, dtype=torch.int32, device=eng.device),
                                   torch.full((1,), a.tokens, dtype=torch.int32, device=eng.device), cache, a.tokens)
    print(f"{a.dtype}: logits finite {bool(torch.isfinite(logits).all())}")
    for name, v in seen.items():
        first = next((i for i, x in enumerate(v) if x == float("inf")), None)
        print(f"{name:22s} calls {len(v):4d} max {max(v):.4g}  first non-finite call {first}  top5 "
              f"{[round(x, 2) for x in sorted(v)[-5:]]}")
    eng.close()


if __name__ == "__main__":
    main()
