"""Hugging Face transformers + accelerate offload: the peer the benchmarks measure layerstream against."""

from __future__ import annotations

import time

import torch

HOST_BYTES = 400 * 2**30  # accelerate's CPU share: not the constraint under test


def load_offloaded(model_dir: str, budget: int | None, dtype: torch.dtype | str = "auto"):
    """``AutoModelForCausalLM.from_pretrained(device_map="auto")`` with at most ``budget`` bytes on
    GPU 0 and the rest in host memory (accelerate moves those layers in per forward); without CUDA
    every layer stays on the CPU. Returns (model, load seconds); ImportError when transformers or
    accelerate is missing."""
    from transformers import AutoModelForCausalLM
    import accelerate  # noqa: F401 - device_map="auto" needs it; fail here, not inside from_pretrained

    if torch.cuda.is_available():
        max_memory = {0: budget, "cpu": HOST_BYTES} if budget is not None else None
    else:
        max_memory = {"cpu": HOST_BYTES}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto", max_memory=max_memory)
    return model.eval(), time.perf_counter() - t0


def gpu_modules(model) -> int:
    """How many of the model's device-map entries accelerate placed on a GPU (a model loaded whole on
    one device has no map: its parameters' device decides)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:
        return int(next(model.parameters()).device.type == "cuda")
    return sum(1 for d in device_map.values() if d not in ("cpu", "disk"))
