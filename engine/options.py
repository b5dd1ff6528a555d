"""How an engine runs (``EngineOptions``) and the choices made from it before loading: device, compute dtype,
context length, the host lane's mode (``engine.engine.Engine`` applies them at load)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.config import ModelConfig

# threads loading weights (reading, packing, pinning) unless --threads says: at most the CPUs this process may use
# (8 on a 2-core machine had each convert a layer at once, 1.6x its bytes of temporaries apiece)
LOAD_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def auto_host_mode(device: torch.device, streams: bool) -> str:
    """``--host-compute auto`` as planned: ``off`` where no host layer could help, so the host's rate is not
    measured and the plan says nothing of a lane (a CPU run; a model whose layers all fit: not ``streams``)."""
    return "auto" if device.type == "cuda" and streams else "off"


@dataclass
class EngineOptions:
    """How to run: device, compute dtype, kernels, budgets and KV-cache shape."""

    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto (the checkpoint's, fp32 on CPU for fp16) | bf16 | fp16 | fp32
    kernels: str = "auto"  # auto (triton on CUDA, torch on CPU) | triton | torch
    vram_budget: int | None = None  # bytes; None = as much as is free
    host_budget: int | None = None  # bytes of pinned host memory for streamed layers
    host_budget_auto: bool = False  # host_budget is the CLI's default, not the user's (engine.host_ram.reserve_room)
    batch: int = 1
    max_context: int = 4096
    max_context_auto: bool = False  # max_context is a default: fit_context lowers it to the model's trained context
    prefill_chunk: int = 2048
    prefill_chunk_auto: bool = False  # prefill_chunk is a default: the planner may lower it to fit the budget
    threads: int = LOAD_THREADS
    trace: bool = False
    cuda_graph: bool = True  # replay the decode step as CUDA graphs (CUDA + triton kernels; see engine.graphs)
    cap_allocator: bool = True  # with a vram_budget on CUDA: the process's reserved memory stays inside it
    quantize: str | None = None  # int8 | int4: round-to-nearest the layers' linear weights at load
    quant_group: int = 128  # --quantize group size (-1: one scale per output row)
    quant_cache: bool = False  # keep repacked / rounded layers in a cache file (engine.quant.cache)
    host_compute: str | int = "off"  # auto | off | N: decode steps compute host layers on the CPU (memory.host_lane)
    prefill_states: str = "auto"  # auto | vram | host: where a layer-major prefill's prompt states wait (planner)
    first_prompts: tuple[int, ...] = ()  # the first generate's prompt lengths: its prefill compiles ahead at load


def fit_context(cfg: ModelConfig, opts: EngineOptions) -> None:
    """A default ``opts.max_context`` (``max_context_auto``) lowered to the positions the model was trained on
    (``max_position_embeddings``; a GGUF's ``context_length``), so a short-context model gets a KV cache it can
    use and no note; one that was asked for stays (the plan notes it when it is past them). A model whose
    attention slides (``ModelConfig.attention_window``: Mistral-7B-v0.1's 4096) is held to its window, which this
    engine's attention does not implement: a default is lowered to it, a larger one asked for is an error (past
    the window the logits silently differed from the model's)."""
    if opts.max_context_auto and opts.max_context > cfg.max_position_embeddings:
        opts.max_context = max(2, cfg.max_position_embeddings)
    window = cfg.attention_window
    if window is not None and opts.max_context > window:
        if not opts.max_context_auto:
            raise ValueError(f"this model's attention slides over the last {window} tokens (sliding_window in "
                             f"config.json), which layerstream does not implement, so a context of "
                             f"{opts.max_context} would give wrong output past {window} tokens: use --max-context "
                             f"{window} or less")
        opts.max_context = max(2, window)


def pick_device(name: str) -> torch.device:
    """Resolve --device; a clear error when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA GPU is visible (torch.cuda.is_available() is "
                         "False); use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if name not in ("cuda", "cpu"):
        raise ValueError(f"unknown --device {name!r}: use auto, cuda or cpu")
    return torch.device(name)


def pick_dtype(name: str, file_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32  # half-precision matmuls on most CPUs are slow
        return file_dtype
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}: use auto, bf16, fp16 or fp32")
    return DTYPES[name]
